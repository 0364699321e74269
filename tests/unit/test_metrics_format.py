"""The textfile format: label values escaped so Prometheus' own parser reads them back."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from libqmpbackup.metrics import RunMetrics, parse, render


def test_odd_target_names_survive_a_round_trip_and_prometheus_parses_them(tmp_path: Path) -> None:
    odd = tmp_path / 'back"up\\dir\nwith newline'
    odd.mkdir()
    prom = tmp_path / "q.prom"
    prom.write_text("garbage that is not ours\nnode_other_metric 1\n")
    record = RunMetrics.start(prom, odd, "prune")
    assert record is not None
    record.chains = (2, 1)
    record.finish(0)
    text = prom.read_text()
    assert parse(text) and render(parse(text)) == text, "a rewrite changes nothing"
    labels = {s.labels["target"] for f in text_string_to_metric_families(text) for s in f.samples}
    assert labels == {str(odd)}
    assert "garbage" not in text and "node_other_metric" not in text


def test_exit_12_records_nothing(tmp_path: Path) -> None:
    """--image of a running VM: qmpbackup-vm runs the live backup next; no false failure between."""
    record = RunMetrics.start(tmp_path / "q.prom", tmp_path, "backup")
    assert record is not None
    record.finish(12)
    assert list(tmp_path.iterdir()) == []
