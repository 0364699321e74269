"""The ``qmpbackup`` command: back up a running QEMU VM over QMP."""
