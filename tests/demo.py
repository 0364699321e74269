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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vm import MiB, Disk, TestVM  # noqa: E402

BIN = Path(sys.executable).parent


def show(argv: list[str]) -> str:
    """Run a command the way an admin would type it, echoing it first."""
    print(f"\n$ {shlex.join(argv)}", flush=True)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed: exit code {proc.returncode}")
    return proc.stdout


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
    if args.keep:
        print(f"\nkept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print("\ndemo finished: full + incremental backup restored and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
