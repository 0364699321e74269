"""qmpbackup's library: backups of live QEMU VMs over QMP, and restores with qemu-img.

Subpackages by concern: :mod:`.qemu` (QMP, guest agent, qemu-img, devices),
:mod:`.backup` (a backup run and the VM-side commands), :mod:`.restore`
(reading folders, chain rules, merge and in-place restores).  The modules at
this level are shared by both sides: errors and exit codes, names, the chain
metadata, the target folder layout, locks, the restore journal, logging,
the ``--json`` output and the command runner; and retention
(:mod:`.retention` decides which chains a prune keeps, :mod:`.prune` deletes
the others in any backup folder, no VM needed).  See docs/architecture.md.
"""

__version__ = "0.1.0"
