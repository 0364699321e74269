"""Talking to QEMU: the QMP session, the guest agent, qemu-img, device discovery, and
the qemu-storage-daemon that serves the images of a VM that is shut down.

Everything here is a thin, typed layer over one QEMU interface and knows
nothing about chains or folders.  It may import only :mod:`libqmpbackup.errors`
(and :mod:`libqmpbackup.store.names` for the tool's reserved names).  Nothing here
imports :mod:`qemu.qmp` at package import time: :mod:`.qemuimg` is used by
restores, which must not load the QMP client.
"""
