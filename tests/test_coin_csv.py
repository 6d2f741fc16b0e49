"""Import of the official CoIN CSV: records, the odd-row hard-negative map, and errors with file/line/field."""

from __future__ import annotations

import csv

import pytest

from coin_ds.data.coin_csv import import_coin_csv
from coin_ds.data.records import RecordError

HEADER = ["", "original_instruction", "paraphrased_instruction", "targets", "task_name", "keyword_data"]


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _row(i, task="sst2", target="positive"):
    # rendered instruction + input over several lines, as in the official file
    return [i, f"Is this review positive or negative?\n\nreview {i}", f"What is the sentiment?\n\nreview {i}",
            target, task, "{}"]


def test_import_records_and_symmetric_pairs(tmp_path):
    path = tmp_path / "coin.csv"
    _write(path, [_row(0), _row(1, target="negative"), _row(2), _row(3, target="negative"), _row(4)])
    records, negatives = import_coin_csv(path)
    assert len(records) == 5
    r = records[1]
    assert (r.task, r.output, r.input) == ("sst2", "negative", "")
    assert r.instruction == "Is this review positive or negative?\n\nreview 1"
    assert r.paraphrases == ["What is the sentiment?\n\nreview 1"]
    assert negatives == {0: 1, 1: 0, 2: 3, 3: 2}  # row 4 has no partner


def test_bad_row_names_line_and_field(tmp_path):
    path = tmp_path / "coin.csv"
    bad = _row(2)
    bad[3] = ""
    _write(path, [_row(0), _row(1), bad])
    with pytest.raises(RecordError) as e:
        import_coin_csv(path)
    # header is line 1 and each row spans 5 lines (two fields hold two newlines each), so row 2 starts on line 12
    assert (e.value.line, e.value.field) == (12, "targets") and "coin.csv" in str(e.value)


def test_missing_columns(tmp_path):
    path = tmp_path / "coin.csv"
    _write(path, [["a", "b"]], header=["original_instruction", "targets"])
    with pytest.raises(RecordError, match="paraphrased_instruction"):
        import_coin_csv(path)
    _write(path, [["a", "b", "c"]], header=["original_instruction", "paraphrased_instruction", "targets"])
    with pytest.raises(RecordError, match="task-name column"):
        import_coin_csv(path)
    with pytest.raises(RecordError, match="not found"):
        import_coin_csv(tmp_path / "nope.csv")
