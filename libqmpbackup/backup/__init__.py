"""One backup run against a VM, and the commands that act on a VM (info, cleanup).

The VM is running (its QMP socket, :mod:`.session`), or shut down: then a
private qemu-storage-daemon serves its images (:mod:`.image_disks` chooses
their disk ids); the run itself does not tell the two apart.

``run`` drives a run: plan (pure, :mod:`.plan`), leftovers of killed runs
(:mod:`.leftovers`), bitmaps (:mod:`.bitmaps`), the grouped transaction and
its jobs (:mod:`.jobs`), quiesce and the shutdown guard around them.  May
import :mod:`libqmpbackup.qemu` and :mod:`libqmpbackup.store` (the backup folder)
and the shared top-level modules; never
:mod:`libqmpbackup.restore`.
"""
