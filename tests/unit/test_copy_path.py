"""Copy offload and sparse copies: the schema probe and the decisions, without QEMU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libqmpbackup.backup import offload
from libqmpbackup.backup.plan import BackupOptions, plan_backup, whole_disk_sync
from libqmpbackup.errors import UsageError
from libqmpbackup.qemu.capabilities import from_schema
from libqmpbackup.qemu.devices import BlockDevice
from tests.helpers import read_store


def schema(x_perf_members: tuple[str, ...] = ("use-copy-range", "max-workers", "max-chunk"),
           with_x_perf: bool = True) -> list[dict[str, Any]]:
    """The shape QEMU 7.2 answers with: opaque type names, real command and member names."""
    members: list[dict[str, Any]] = [{"name": "job-id", "type": "str"}]
    if with_x_perf:
        members.append({"name": "x-perf", "default": None, "type": "282",
                        "features": ["unstable"]})
    return [
        {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
        {"name": "blockdev-backup", "meta-type": "command", "arg-type": "31", "ret-type": "0"},
        {"name": "31", "meta-type": "object", "members": members},
        {"name": "282", "meta-type": "object",
         "members": [{"name": n, "type": "bool"} for n in x_perf_members]},
    ]


def test_schema_with_x_perf_offers_copy_range() -> None:
    caps = from_schema(schema())
    assert caps.copy_range
    assert caps.x_perf_members == {"use-copy-range", "max-workers", "max-chunk"}


@pytest.mark.parametrize("reply", [
    schema(with_x_perf=False),                      # QEMU < 6.0
    schema(x_perf_members=("max-workers",)),        # a QEMU that renamed the member
    [e for e in schema() if e["name"] != "282"],    # dangling type reference
    [{"name": "blockdev-backup", "meta-type": "event"}],
    [], {}, None, "schema", [1, "x", None],
])
def test_unexpected_schema_means_no_offload(reply: Any) -> None:
    assert not from_schema(reply).copy_range


def test_auto_uses_offload_only_where_offered() -> None:
    choice = offload.choose("auto", False, True)
    assert choice.x_perf == {"use-copy-range": True} and not choice.required
    assert offload.choose("auto", False, False).x_perf is None
    assert offload.choose("auto", False, None).x_perf is None


def test_on_requires_offload() -> None:
    choice = offload.choose("on", False, True)
    assert choice.x_perf and choice.required
    with pytest.raises(UsageError, match="no x-perf"):
        offload.choose("on", False, False)


def test_never_with_compress_or_off() -> None:
    assert offload.choose("auto", True, True).x_perf is None
    assert offload.choose("off", False, True).x_perf is None
    with pytest.raises(UsageError, match="--compress"):
        offload.check_options("on", True)
    with pytest.raises(UsageError):
        offload.check_options("sometimes", False)


def test_choice_never_shares_the_module_constant() -> None:
    first = offload.choose("auto", False, True)
    assert first.x_perf is not None
    first.x_perf["max-workers"] = 1
    assert offload.choose("auto", False, True).x_perf == {"use-copy-range": True}


@pytest.mark.parametrize("mode, compress, whole, probe", [
    ("auto", False, offload.AUTO_MIN_BYTES, True),
    ("auto", False, offload.AUTO_MIN_BYTES - 1, False),   # small disks, incrementals: not worth it
    ("auto", False, 0, False),
    ("auto", True, 1 << 40, False),
    ("off", False, 1 << 40, False),
    ("on", False, 0, True),
])
def test_schema_is_asked_only_when_it_pays(mode: str, compress: bool, whole: int,
                                           probe: bool) -> None:
    assert offload.wants_probe(mode, compress, whole) is probe


def disk(name: str, *, backing: bool, driver: str = "qcow2") -> BlockDevice:
    return BlockDevice(disk_id=name, device=name, qdev="", node=f"#{name}", driver=driver,
                       filename=f"/images/{name}.{driver}", virtual_size=1 << 30,
                       read_only=False, removable=False, qcow2_compat="1.1",
                       has_backing=backing)


def test_whole_disk_copies_skip_unallocated_only_without_backing_file() -> None:
    assert whole_disk_sync(disk("flat", backing=False)) == "top"
    assert whole_disk_sync(disk("overlay", backing=True)) == "full"
    assert whole_disk_sync(disk("raw", backing=False, driver="raw")) == "top"


def test_unknown_backing_counts_as_backed() -> None:
    unknown = BlockDevice(disk_id="d", device="d", qdev="", node="n", driver="qcow2",
                          filename="/d.qcow2", virtual_size=1, read_only=False, removable=False)
    assert whole_disk_sync(unknown) == "full"


def test_plan_full_and_copy_use_top_for_flat_disks(tmp_path: Path) -> None:
    disks = [disk("flat", backing=False), disk("overlay", backing=True)]
    for level in ("full", "copy"):
        root = tmp_path / level
        root.mkdir()
        opts = BackupOptions(level=level, target=root)
        plan = plan_backup(disks, read_store(root), opts, 1700000000, True)
        assert {j.disk.disk_id: j.sync for j in plan.jobs} == {"flat": "top", "overlay": "full"}
