"""Coming from upstream qmpbackup 0.67: its layouts, its folders, its qmprestore habits.

Every restore is proven by content against a reference of the disk taken at
backup time.  Upstream folders are built the way upstream 0.67 writes them:
real ``blockdev-backup`` FULL (with bitmap ``qmpbackup-<uuid>``) and INC
jobs, files without backing files, ``DIR/uuid`` and ``DIR/<disk>.config``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from tests.helpers import backup, digests, metadata
from tests.vm import Disk, MiB, TestVM, identical, run

DISKS = ("virtio0", "ide0-hd0")
WRITES = [   # guest writes before each point: (disk, pattern, offset, length)
    [("virtio0", 0x11, 0, 2 * MiB), ("ide0-hd0", 0x12, 1 * MiB, 64 * 1024)],
    [("virtio0", 0x21, 1 * MiB, 128 * 1024), ("ide0-hd0", 0x22, 0, 8192)],
    [("virtio0", 0x31, 5 * MiB, 64 * 1024), ("ide0-hd0", 0x00, 1 * MiB, 64 * 1024)],
    [("virtio0", 0x41, 0, 64 * 1024)],
]


def small_vm(folder: Path) -> TestVM:
    return TestVM(folder, [Disk("virtio0", "virtio", "qcow2", 16 * MiB),
                           Disk("ide0-hd0", "ide", "qcow2", 8 * MiB)])


def point(vm: TestVM, refs: Path, index: int) -> None:
    """Write point INDEX's data and keep a reference of every disk."""
    for disk, pattern, offset, length in WRITES[index]:
        vm.write(disk, pattern, offset, length)
    refs.mkdir(exist_ok=True)
    for disk in DISKS:
        vm.reference(disk, refs / f"{disk}-{index}.raw")


def ref(refs: Path, disk: str, index: int) -> Path:
    return refs / f"{disk}-{index}.raw"


def labels(root: Path, disk: str, name: str = "qmpbackup.json") -> list[str]:
    backups = metadata(root, name)["chains"][-1]["disks"][disk]["backups"]
    return [f"{b['level'].upper()}-{b['time']}" for b in backups]


def merged(cli, tmp_path: Path, *argv: object) -> Path:
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.qcow2"
    cli("qmprestore", "merge", *argv, "--targetfile", out).ok()
    return out


# -- layouts: --no-subdir, --no-timestamp, --no-symlink ----------------------------------------

def test_no_subdir_no_timestamp_no_symlink_full_then_inc_restore_by_filter(
        cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "flat", tmp_path / "refs"
    flags = ("--no-subdir", "--no-symlink", "--no-timestamp")
    with small_vm(tmp_path / "vm") as vm:
        point(vm, refs, 0)
        backup(cli, vm, root, "full", *flags).ok()
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith("INC")) == [
            "ide0-hd0.qcow2", "qmpbackup.json", "virtio0.qcow2"], "FULLs named like the images"
        assert not list(root.glob("FULL*")), "--no-symlink: no FULL-<image> link"
        point(vm, refs, 1)
        backup(cli, vm, root, "inc", *flags).ok()
        point(vm, refs, 2)
        backup(cli, vm, root, "inc").ok()    # the layout is the chain's: no need to repeat it
        assert len(list(root.glob("INC-*"))) == 4 and not [p for p in root.iterdir() if p.is_dir()]
    before = digests(root)
    listing = cli("qmprestore", "list", "--dir", root, "--filter", "ide0").ok().out
    assert "ide0-hd0" in listing and "virtio0" not in listing
    for disk in DISKS:
        for index, name in enumerate(labels(root, disk)):
            out = merged(cli, tmp_path, "--dir", root, "--filter", disk, "--until", name)
            assert identical(out, ref(refs, disk, index)), f"{disk} at {name}"
        out = merged(cli, tmp_path, "--filter", disk, "--dir", root)
        assert identical(out, ref(refs, disk, 2))
    whole = tmp_path / "whole"
    cli("qmprestore", "merge", "--dir", root, "--until", labels(root, "virtio0")[1],
        "--targetdir", whole).ok()
    for disk in DISKS:
        assert identical(whole / f"{disk}.qcow2", ref(refs, disk, 1))
    assert digests(root) == before, "merge changed the backup folder"
    cli("qmprestore", "rebase", "--dir", root).failed(2, "works on one disk", "--filter")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    cli("qmprestore", "--filter", "virtio0", "rebase", "--dir", copy,
        "--until", labels(copy, "virtio0")[1]).ok()
    assert identical(copy / "image", ref(refs, "virtio0", 1))
    cli("qmprestore", "commit", "--dir", copy, "--filter", "ide0").ok()
    out = merged(cli, tmp_path, "--dir", copy, "--filter", "ide0")
    assert identical(out, ref(refs, "ide0-hd0", 2))


def test_no_timestamp_links_are_for_people_and_never_followed(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "b", tmp_path / "refs"
    with small_vm(tmp_path / "vm") as vm:
        point(vm, refs, 0)
        backup(cli, vm, root, "full", "--no-timestamp").ok()
        point(vm, refs, 1)
        backup(cli, vm, root, "inc", "--no-timestamp").ok()
        copies = tmp_path / "copies"
        backup(cli, vm, copies, "copy", "--no-timestamp", "--include", "virtio0").ok()
        assert os.readlink(copies / "virtio0" / "COPY-virtio0.qcow2") == "virtio0.qcow2"
    folder = root / "virtio0"
    assert os.readlink(folder / "FULL-virtio0.qcow2") == "virtio0.qcow2"
    assert (folder / "virtio0.qcow2").is_file()
    (inc,) = folder.glob("INC-*")
    # someone re-points the convenience link: restores go by the metadata, not the link
    (folder / "FULL-virtio0.qcow2").unlink()
    os.symlink(inc.name, folder / "FULL-virtio0.qcow2")
    for index, name in enumerate(labels(root, "virtio0")):
        assert identical(merged(cli, tmp_path, "--dir", folder, "--until", name),
                         ref(refs, "virtio0", index))
    assert identical(merged(cli, tmp_path, "--dir", copies / "virtio0"), ref(refs, "virtio0", 1))


def test_no_subdir_refuses_disks_that_would_share_file_names(cli, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    disks = [Disk("virtio0", "virtio", "qcow2", 4 * MiB, path=tmp_path / "a" / "disk.qcow2"),
             Disk("virtio1", "virtio", "qcow2", 4 * MiB, path=tmp_path / "b" / "disk.qcow2")]
    with TestVM(tmp_path / "vm", disks) as vm:
        backup(cli, vm, tmp_path / "t", "full", "--no-subdir").failed(
            2, "--no-subdir", "virtio0", "virtio1", "disk.qcow2")
        assert not (tmp_path / "t").exists() and vm.tool_leftovers() == []
        assert all(not b for b in vm.bitmaps().values())


# -- disk folders on their own ------------------------------------------------------------------

def test_a_disk_folder_copied_alone_restores_with_every_command(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "b", tmp_path / "refs"
    with small_vm(tmp_path / "vm") as vm:
        for index in range(3):
            point(vm, refs, index)
            backup(cli, vm, root, "full" if index == 0 else "inc").ok()
    names = labels(root, "virtio0")
    records = metadata(root)["chains"][0]["disks"]["virtio0"]["backups"]
    assert metadata(root / "virtio0", "qmpbackup-disk.json")["chains"][0]["disks"] == {
        "virtio0": {"backups": records, "folder": ""}}, "the disk folder's own records"

    def alone(name: str) -> Path:
        folder = tmp_path / "alone" / name    # what upstream's README and test script do
        shutil.copytree(root / "virtio0", folder, symlinks=True)
        return folder

    listing = cli("qmprestore", "list", "--dir", alone("listed")).ok().out
    assert all(n in listing for n in names)
    for index, name in enumerate(names):
        assert identical(merged(cli, tmp_path, "--dir", tmp_path / "alone" / "listed",
                                "--until", name), ref(refs, "virtio0", index))
    rebased = alone("rebase")
    cli("qmprestore", "rebase", "--dir", rebased, "--until", names[1]).ok()
    assert identical(rebased / "image", ref(refs, "virtio0", 1))
    committed = alone("commit")
    cli("qmprestore", "commit", "--dir", committed, "--until", names[1]).ok()
    assert identical(committed / "image", ref(refs, "virtio0", 1))
    assert identical(merged(cli, tmp_path, "--dir", committed), ref(refs, "virtio0", 2)), \
        "the later point still restores after commit"
    snap = alone("snap")
    cli("qmprestore", "snapshotrebase", "--dir", snap).ok()
    assert identical(snap / "image", ref(refs, "virtio0", 2))
    # same checks as in place: a missing INC or an unknown one is refused
    broken = alone("broken")
    (broken / f"{records[1]['file']}").unlink()
    cli("qmprestore", "merge", "--dir", broken, "--targetfile", tmp_path / "x.qcow2").failed(
        6, "is missing")
    cli("qmprestore", "--skip-check", "rebase", "--dir", alone("skipped")).ok()
    extra = alone("extra")
    shutil.copy2(extra / records[2]["file"], extra / f"INC-{records[2]['time'] + 5}-x.qcow2")
    cli("qmprestore", "rebase", "--dir", extra).failed(6, "not in the chain metadata")


# -- folders written by upstream qmpbackup 0.67 -------------------------------------------------

def upstream_backup(vm: TestVM, root: Path, level: str, uuid: str, when: int) -> None:
    """One run the way upstream 0.67 writes it: FULL/INC files with no backing file."""
    nodes = {b["device"]: b["inserted"]["node-name"] for b in vm.cmd("query-block")
             if b.get("inserted")}
    actions, targets = [], []
    for disk in DISKS:
        source = vm.disk(disk).path
        assert source is not None
        folder = root / disk
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{level.upper()}-{when}-{source.name}"
        size = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(source)]).stdout)[
            "virtual-size"]
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)])
        node = f"up-{disk}"
        vm.cmd("blockdev-add", driver="qcow2", **{"node-name": node, "backing": None,
                                                  "file": {"driver": "file",
                                                           "filename": str(target)}})
        targets.append(node)
        bitmap = f"qmpbackup-{uuid}"
        if level == "full":
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": nodes[disk], "name": bitmap, "persistent": True}})
            backup_args = {"sync": "full"}
        else:
            backup_args = {"sync": "incremental", "bitmap": bitmap}
        actions.append({"type": "blockdev-backup",
                        "data": {"device": nodes[disk], "target": node, "job-id": f"up-{disk}",
                                 **backup_args}})
        (root / f"{disk}.config").write_text(json.dumps({"node": disk, "filename": str(source)}))
    vm.cmd("transaction", actions=actions)
    deadline = time.monotonic() + 30
    while vm.cmd("query-jobs"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for node in targets:
        vm.cmd("blockdev-del", **{"node-name": node})
    (root / "uuid").write_text(uuid + "\n")


def test_upstream_folder_restores_and_auto_continues_it_in_place(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "upstream", tmp_path / "refs"
    now = int(time.time())
    with small_vm(tmp_path / "vm") as vm:
        point(vm, refs, 0)
        upstream_backup(vm, root, "full", "testme", now - 100)
        point(vm, refs, 1)
        upstream_backup(vm, root, "inc", "testme", now - 50)
        theirs = digests(root)
        infos = [json.loads(run(["qemu-img", "info", "--output=json", str(p)]).stdout)
                 for p in root.glob("*/INC-*")]
        assert infos and all("backing-filename" not in i for i in infos), "as upstream: no backing"

        # restore: list, merge every point, rebase a copy, commit a disk folder copied alone
        listing = cli("qmprestore", "list", "--dir", root).ok().out
        assert "testme" in listing and f"INC-{now - 50}" in listing
        for disk in DISKS:
            for index, when in enumerate((f"FULL-{now - 100}", f"INC-{now - 50}")):
                out = merged(cli, tmp_path, "--dir", root / disk, "--until", when)
                assert identical(out, ref(refs, disk, index)), f"{disk} at {when}"
        mnt = tmp_path / "mnt"   # mount spells the chain out too: no backing file needed
        mnt.mkdir()
        cli("qmprestore", "mount", "--dir", root, "--until", f"INC-{now - 50}", mnt).ok()
        try:
            for disk in DISKS:
                assert identical(mnt / f"{disk}.raw", ref(refs, disk, 1)), f"mounted {disk}"
        finally:
            cli("qmprestore", "umount", mnt).ok()
        assert list(mnt.iterdir()) == []
        copy = tmp_path / "rebase"
        shutil.copytree(root / "ide0-hd0", copy)     # upstream's test: cp -a DIR/disk/ /tmp/rebase
        cli("qmprestore", "--skip-check", "rebase", "--dir", copy).ok()
        assert identical(copy / "image", ref(refs, "ide0-hd0", 1))
        alone = tmp_path / "commit"
        shutil.copytree(root / "virtio0", alone)
        cli("qmprestore", "commit", "--dir", alone).ok()
        assert identical(alone / "image", ref(refs, "virtio0", 1))
        assert digests(root) == theirs, "restores changed the upstream folder"

        # qmpbackup continues the chain in place and adopts it into qmpbackup.json
        point(vm, refs, 2)
        result = backup(cli, vm, root, "auto").ok()
        assert "upstream" in result.err and "continuing" in result.err
        chain = metadata(root)["chains"][0]
        assert (chain["uuid"], chain["bitmap"]) == ("testme", "qmpbackup-testme")
        point(vm, refs, 3)
        backup(cli, vm, root, "inc").ok()
        assert {k: v for k, v in digests(root).items() if k in theirs} == theirs, \
            "upstream's files are never changed or deleted"
        assert vm.tool_leftovers() == []
        for disk in DISKS:
            names = labels(root, disk)
            assert names[:2] == [f"FULL-{now - 100}", f"INC-{now - 50}"] and len(names) == 4
            for index, name in enumerate(names):
                out = merged(cli, tmp_path, "--dir", root / disk, "--until", name)
                assert identical(out, ref(refs, disk, index)), f"{disk} at {name}"
        blockdev = cli("qmpbackup", "--socket", vm.tool_socket, "info", "--show",
                       "blockdev").ok().out
        assert blockdev.count("qmpbackup-testme") == 2, blockdev

        # a VM that lost the chain's bitmap cannot continue an upstream chain with inc
        other = tmp_path / "other"
        shutil.copytree(root, other, ignore=shutil.ignore_patterns("qmpbackup*.json"))
        vm.cmd("block-dirty-bitmap-remove", node="virtio0", name="qmpbackup-testme")
        backup(cli, vm, other, "inc").failed(6, "has no bitmap qmpbackup-testme")
        assert not (other / "qmpbackup.json").exists()


def test_a_flat_untimestamped_folder_gets_a_second_chain_and_is_pruned(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "flat", tmp_path / "refs"
    flags = ("--no-subdir", "--no-timestamp", "--no-symlink")
    with small_vm(tmp_path / "vm") as vm:
        point(vm, refs, 0)
        backup(cli, vm, root, "auto", *flags).ok()
        first = metadata(root)["chains"][0]
        for disk in DISKS:   # the VM loses the chain's bitmaps: auto starts a new chain there
            vm.cmd("block-dirty-bitmap-remove", node=disk, name=first["bitmap"])
        point(vm, refs, 1)
        backup(cli, vm, root, "auto").ok()
        point(vm, refs, 2)
        backup(cli, vm, root, "auto").ok()
    chains = metadata(root)["chains"]
    assert len(chains) == 2
    second = chains[1]["disks"]["virtio0"]["backups"]
    assert second[0]["file"].startswith("FULL-"), "the image's name is taken: the time is used"
    assert (root / "virtio0.qcow2").is_file(), "the first chain's FULL is never overwritten"
    assert identical(merged(cli, tmp_path, "--dir", root, "--filter", "virtio0", "--uuid",
                            first["uuid"]), ref(refs, "virtio0", 0))
    cli("qmpbackup", "prune", "--target", root, "--keep", "1").ok()
    assert not (root / "virtio0.qcow2").exists() and not (root / "ide0-hd0.qcow2").exists()
    assert len(metadata(root)["chains"]) == 1
    for disk in DISKS:
        assert identical(merged(cli, tmp_path, "--dir", root, "--filter", disk), ref(refs, disk, 2))


def test_auto_into_a_folder_without_chain_names_the_real_problem(cli, tmp_path: Path) -> None:
    target = tmp_path / "b"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with small_vm(tmp_path / "vm") as vm:
        result = backup(cli, vm, target, "auto").failed(5, "not empty", "holds no chain")
        assert "--level inc" not in result.err
