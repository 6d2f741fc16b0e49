"""`coin-ds augment`: output, counts, resume, and clear errors for bad records."""

from __future__ import annotations

import json
import os
import re

from coin_ds.cli import main as cli
from coin_ds.data.records import load_records, save_records
from coin_ds.data.synthetic import generate_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARGS = ["--levels", "char,sentence,semantic", "--per-instruction", "2", "--seed", "7", "--quiet"]


def _records(tmp_path, n=5):
    recs = generate_records(n, seed=1)
    for r in recs:
        r.paraphrases = r.paraphrases[:1]  # leave other templates for the semantic level to find
    path = tmp_path / "in.jsonl"
    save_records(recs, path)
    return recs, path


def test_augment_fills_paraphrases_and_reports_counts(tmp_path, capsys):
    recs, src = _records(tmp_path)
    out = tmp_path / "out.jsonl"
    assert cli(["augment", str(src), str(out), *ARGS]) == 0
    got = load_records(out)
    assert [(r.task, r.instruction, r.input, r.output) for r in got] == \
           [(r.task, r.instruction, r.input, r.output) for r in recs]
    for before, after in zip(recs, got):
        assert after.paraphrases[:1] == before.paraphrases  # existing kept first
        assert len(after.paraphrases) == 1 + 3 * 2 and before.instruction not in after.paraphrases
        assert sum(p.startswith(before.instruction + " ") for p in after.paraphrases) >= 2  # sentence level
    err = capsys.readouterr().err
    assert f"{len(recs)} records" in err
    for level in ("char", "sentence", "semantic"):
        assert re.search(rf"{level}\s+\+\s*{2 * len(recs)} paraphrases\s+0 records got fewer", err), err


def test_augment_resume_gives_the_same_file(tmp_path):
    _, src = _records(tmp_path)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert cli(["augment", str(src), str(full), *ARGS]) == 0
    lines = full.read_text().splitlines(keepends=True)
    # an interrupted run: 7 complete lines and a torn 8th
    part.write_text("".join(lines[:7]) + lines[7][:20])
    assert cli(["augment", str(src), str(part), *ARGS]) == 0
    assert part.read_text() == full.read_text()
    # a second run on a complete OUT writes nothing new
    assert cli(["augment", str(src), str(part), *ARGS]) == 0
    assert part.read_text() == full.read_text()


def test_augment_refuses_to_resume_a_foreign_output(tmp_path, capsys):
    _, src = _records(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"task": "x", "instruction": "y", "input": "", "output": "z"}) + "\n")
    assert cli(["augment", str(src), str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "out.jsonl, line 1, field 'task'" in err and "--overwrite" in err
    assert cli(["augment", str(src), str(out), *ARGS, "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 20


def test_augment_bad_record_names_file_line_field(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    good = {"task": "t", "instruction": "Say 'a' or 'b'.", "input": "x", "output": "a"}
    src.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "output": 3}) + "\n")
    assert cli(["augment", str(src), str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 3, field 'output'" in err


def test_augment_unknown_level(tmp_path, capsys):
    _, src = _records(tmp_path, 1)
    assert cli(["augment", str(src), str(tmp_path / "o.jsonl"), "--levels", "char,emoji"]) == 2
    assert "unknown perturbation level 'emoji'" in capsys.readouterr().err


def test_augment_protects_label_words_of_unknown_tasks(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"task": "nli", "instruction": "Does the premise entail the hypothesis? Say 'yes' or 'no'.",
             "input": f"p{i}", "output": "yes" if i % 2 else "no"} for i in range(6)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert cli(["augment", str(src), str(out), "--levels", "char", "-k", "3", "--rate", "1.0", "--quiet"]) == 0
    for rec in load_records(out):
        assert len(rec.paraphrases) == 3
        assert all("'yes' or 'no'" in p for p in rec.paraphrases)
