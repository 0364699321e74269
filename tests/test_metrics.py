"""--metrics-file: a real Prometheus text-format parser reads what backup and prune runs wrote.

One file serves every target of the host: each run merges its own series
into it.  A failed run keeps the disks' success time (the alert's input) and
sets their attempt time and exit code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import DISKS, backup

pytestmark = pytest.mark.usefixtures("private_lock_dir")


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the file, through prometheus_client's parser (which rejects bad syntax)."""
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "gauge" and family.documentation
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def of(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_backup_and_prune_runs_merge_into_one_textfile(cli, fvm, tmp_path: Path) -> None:
    prom = tmp_path / "node-exporter" / "qmpbackup.prom"
    prom.parent.mkdir()
    one, two = tmp_path / "one", tmp_path / "two"
    metrics = ("--no-progress", "--metrics-file", prom)
    backup(cli, fvm, one, "full", *metrics).ok()
    fvm.write("virtio0", 0x41, 0, 64 * 1024)
    backup(cli, fvm, one, "inc", *metrics).ok()
    backup(cli, fvm, two, "full", "--include", "virtio0", *metrics).ok()
    ok = samples(prom)
    assert prom.stat().st_mode & 0o777 == 0o644, "node_exporter runs as another user"
    for disk in DISKS:
        labels = {"target": str(one), "disk": disk}
        assert of(ok, "qmpbackup_last_exit_code", **labels) == 0
        assert of(ok, "qmpbackup_restore_points", **labels) == 2
        assert of(ok, "qmpbackup_last_success_level_info", level="inc", **labels) == 1
        assert of(ok, "qmpbackup_last_success_timestamp_seconds", **labels) >= \
            of(ok, "qmpbackup_last_attempt_timestamp_seconds", **labels)
        assert of(ok, "qmpbackup_last_duration_seconds", **labels) > 0
    assert of(ok, "qmpbackup_last_written_bytes", target=str(one), disk="virtio0") >= 64 * 1024
    assert not [k for k in ok if k[0] == "qmpbackup_last_success_level_info"
                and ("level", "full") in k[1] and ("target", str(one)) in k[1]], "one level a disk"
    assert of(ok, "qmpbackup_restore_points", target=str(two), disk="virtio0") == 1
    assert ("disk", "data1") not in {label for key in ok if ("target", str(two)) in key[1]
                                     for label in key[1]}

    # a failed run (the VM's socket is gone): exit code and attempt change, success stays
    cli("qmpbackup", "--socket", tmp_path / "gone.qmp", "backup", "--level", "inc", "--target",
        one, *metrics).failed(3)
    failed = samples(prom)
    for disk in DISKS:
        labels = {"target": str(one), "disk": disk}
        assert of(failed, "qmpbackup_last_exit_code", **labels) == 3
        assert of(failed, "qmpbackup_last_success_timestamp_seconds", **labels) == \
            of(ok, "qmpbackup_last_success_timestamp_seconds", **labels)
        assert of(failed, "qmpbackup_last_attempt_timestamp_seconds", **labels) > \
            of(ok, "qmpbackup_last_attempt_timestamp_seconds", **labels)
    assert of(failed, "qmpbackup_last_exit_code", target=str(two), disk="virtio0") == 0
    # a target that never succeeded still shows its failure, under disk=""
    cli("qmpbackup", "--socket", tmp_path / "gone.qmp", "backup", "--level", "full", "--target",
        tmp_path / "new", *metrics).failed(3)
    assert of(samples(prom), "qmpbackup_last_exit_code", target=str(tmp_path / "new"), disk="") == 3

    backup(cli, fvm, one, "full", *metrics).failed(5)       # not empty: a second chain needs auto
    cli("qmpbackup", "prune", "--target", two, "--keep", "1", "--metrics-file", prom).ok()
    pruned = samples(prom)
    assert of(pruned, "qmpbackup_prune_chains_kept", target=str(two)) == 1
    assert of(pruned, "qmpbackup_prune_chains_removed", target=str(two)) == 0
    assert of(pruned, "qmpbackup_prune_last_exit_code", target=str(two)) == 0
    assert of(pruned, "qmpbackup_last_exit_code", target=str(one), disk="virtio0") == 5
    assert sorted(p.name for p in prom.parent.iterdir()) == [".qmpbackup.prom.lock",
                                                             "qmpbackup.prom"]


def test_a_metrics_file_in_a_missing_folder_is_refused_before_the_run(cli, fvm,
                                                                      tmp_path: Path) -> None:
    backup(cli, fvm, tmp_path / "b", "full", "--metrics-file", tmp_path / "no" / "q.prom") \
        .failed(2, "--metrics-file")
    assert not (tmp_path / "b").exists()
