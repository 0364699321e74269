#!/usr/bin/env python3
"""`make demo`: back up and restore a throwaway VM, showing every command.

Boots a VM (no guest OS) on blank qcow2 disks, writes data through QEMU's
block layer, takes a full and an incremental backup with the installed
``qmpbackup`` command, restores the incremental point with ``qmprestore``
and proves with ``qemu-img compare`` that the restored disk equals the VM's.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.guestvm import GuestUnavailable, GuestVM, ensure_guest, make_data_disk
from tests.vm import Disk, MiB, TestVM

BIN = Path(sys.executable).parent


def show(argv: list[str]) -> str:
    """Run a command the way an admin would type it, echoing it first."""
    print(f"\n$ {shlex.join(argv)}", flush=True)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed: exit code {proc.returncode}")
    return proc.stdout


def real_guest_demo(work: Path, qmpbackup: str, qmprestore: str) -> None:
    """A real Linux guest writes a file; quiesced backups and restores bring it back."""
    try:
        images = ensure_guest()
    except GuestUnavailable as err:
        print(f"\n# skipping the real-guest part: {err}")
        return
    work.mkdir(parents=True)
    backup_dir = work / "backup"
    disk = make_data_disk(work / "data.qcow2", size_mb=32)
    print("\n# a tiny real Linux guest (ext4 data disk on /mnt, qemu-ga) under TCG")
    with GuestVM(images, disk, log_dir=work) as guest:
        sockets = ["--socket", guest.tool_socket, "--agent-socket", guest.qga_socket]
        show([qmpbackup, *sockets, "info", "--show", "agent"])
        print("\n# the guest writes a file (no sync: the freeze must flush it)")
        guest.exec("echo 'written before the full backup' > /mnt/hello.txt")
        show([qmpbackup, *sockets, "backup", "--level", "full", "--quiesce",
              "--target", str(backup_dir)])
        guest.exec("echo 'appended before the incremental' >> /mnt/hello.txt")
        show([qmpbackup, *sockets, "backup", "--level", "inc", "--quiesce",
              "--target", str(backup_dir)])
    for backup in sorted((backup_dir / "virtio0").glob("*.qcow2")):
        restored = work / f"{backup.name.split('-')[0]}.raw"
        show([qmprestore, "merge", "--dir", str(backup_dir / "virtio0"), "--until", backup.name,
              "--format", "raw", "--targetfile", str(restored)])
        show(["e2fsck", "-fn", str(restored)])
        show(["debugfs", "-R", "cat /hello.txt", str(restored)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("demo-work"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args()
    work: Path = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    backup_dir = work / "backup"
    qmpbackup = str(BIN / "qmpbackup")
    qmprestore = str(BIN / "qmprestore")

    disks = [Disk("virtio0", "virtio", "qcow2", 64 * MiB), Disk("virtio1", "virtio", "qcow2", 32 * MiB)]
    with TestVM(work / "vm", disks) as vm:
        print("# a throwaway VM on two blank qcow2 disks:")
        print("$ " + shlex.join(vm.command_line()))
        socket = ["--socket", vm.tool_socket]

        print("\n# the guest writes 8 MiB to each disk (through QEMU's block layer)")
        vm.write("virtio0", 0x11, 0, 8 * MiB)
        vm.write("virtio1", 0x22, 4 * MiB, 8 * MiB)
        show([qmpbackup, *socket, "info", "--show", "blockdev"])
        show([qmpbackup, *socket, "backup", "--level", "full", "--target", str(backup_dir)])

        print("\n# the guest changes 1 MiB on virtio0 and 64 KiB on virtio1")
        vm.write("virtio0", 0x33, 16 * MiB, 1 * MiB)
        vm.write("virtio1", 0x44, 0, 64 * 1024)
        show([qmpbackup, *socket, "info", "--show", "bitmaps"])
        show([qmpbackup, *socket, "backup", "--level", "inc", "--target", str(backup_dir)])
        show([qmpbackup, *socket, "info", "--show", "bitmaps"])

        print("\n# what the guest disks hold now (VM paused while copying):")
        references = {d.name: vm.reference(d.name, work / f"{d.name}-now.raw") for d in disks}
        show(["find", str(backup_dir), "-type", "f"])
        print("\n# the chain is done with: remove its bitmap from the VM")
        show([qmpbackup, *socket, "cleanup", "--remove-bitmaps"])

    show([qmprestore, "list", "--dir", str(backup_dir)])
    print("\n# restore the incremental point of every disk and compare it with the VM's disk")
    for name, reference in references.items():
        point = sorted((backup_dir / name).glob("INC-*"))[-1].name
        restored = work / f"{name}-restored.qcow2"
        show([qmprestore, "merge", "--dir", str(backup_dir / name), "--until", point,
              "--targetfile", str(restored)])
        show(["qemu-img", "compare", str(restored), str(reference)])
        print(f"{name}: restored image identical")
    real_guest_demo(work / "guest", qmpbackup, qmprestore)
    if args.keep:
        print(f"\nkept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print("\ndemo finished: full + incremental backup restored and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
