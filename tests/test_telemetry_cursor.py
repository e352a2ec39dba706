"""The exporters' read position: survives a reopen, starts at 0 when missing or unreadable, and a
half-written replacement never becomes the position."""

from __future__ import annotations

from edge_sdk.runtime.telemetry.cursor import ExportCursor


def test_offset_survives_a_reopen_and_each_exporter_keeps_its_own(tmp_path):
    src = tmp_path / "records.jsonl"
    mqtt, otlp = ExportCursor(src, "mqtt-offset"), ExportCursor(src, "otlp-offset")
    assert mqtt.offset() == 0 and otlp.offset() == 0
    mqtt.save(1234)
    assert ExportCursor(src, "mqtt-offset").offset() == 1234 and otlp.offset() == 0
    assert (tmp_path / "records.jsonl.mqtt-offset").read_text() == "1234"


def test_unreadable_offset_starts_over_and_a_stale_temp_file_is_ignored(tmp_path):
    src = tmp_path / "records.jsonl"
    (tmp_path / "records.jsonl.otlp-offset").write_bytes(b"\xff\x00garbage")
    (tmp_path / "records.jsonl.otlp-offset.tmp").write_text("999")  # a save cut before its rename
    c = ExportCursor(src, "otlp-offset")
    assert c.offset() == 0
    c.save(7)
    assert c.offset() == 7 and not (tmp_path / "records.jsonl.otlp-offset.tmp").exists()
