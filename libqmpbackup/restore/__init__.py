"""Restoring from a backup folder: the chain rules, reading a folder, merge and in-place steps.

No VM is involved: everything works on files with qemu-img.  May import
:mod:`libqmpbackup.qemu.qemuimg` and :mod:`libqmpbackup.store` (the backup folder)
and the shared top-level modules; never
:mod:`libqmpbackup.backup` nor anything that loads :mod:`qemu.qmp`
(a test imports :mod:`qmprestore.cli` and checks that).
"""
