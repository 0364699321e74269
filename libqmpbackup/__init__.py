"""libqmpbackup: live full and incremental backups of running QEMU VMs over QMP."""

__version__ = "0.1.0"
