"""One backup run against a live VM, and the commands that act on a VM (info, cleanup).

``run`` drives a run: plan (pure, :mod:`.plan`), leftovers of killed runs
(:mod:`.leftovers`), bitmaps (:mod:`.bitmaps`), the grouped transaction and
its jobs (:mod:`.jobs`), quiesce and the shutdown guard around them.  May
import :mod:`libqmpbackup.qemu` and the shared top-level modules; never
:mod:`libqmpbackup.restore`.
"""
