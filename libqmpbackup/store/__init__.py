"""The backup folder: everything that knows how a folder is laid out and what its files mean.

Names and the file-name grammar, chain metadata, the intent record, the
restore journal, checksums, the folder-safety rule, upstream 0.67 folders,
retention and prune, the chain-folder lock.  Backup folders are untrusted
input (they may be written by other users or copied back from elsewhere),
so the one rule for reaching their files lives here too.

May import :mod:`libqmpbackup.errors`, the shared top-level modules and
:mod:`libqmpbackup.qemu.qemuimg`; never :mod:`libqmpbackup.backup`,
:mod:`libqmpbackup.restore` nor anything that loads :mod:`qemu.qmp`: both
sides use the store, and restores must not load the QMP client.
"""
