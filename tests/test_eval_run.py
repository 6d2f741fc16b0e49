"""`coin-ds eval` end to end on a tiny model: files written, numbers consistent, inputs validated, ranks sharded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coin_ds.eval.metrics import pdr
from coin_ds.eval.run import main, unit_waves
from coin_ds.prompting import render_prompt
from coin_ds.tiny import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny"), hidden_size=64, layers=2, heads=2))


def run(*argv) -> int:
    return main([*map(str, argv), "--no-progress"])


def test_cli_writes_results_table_and_plot(tiny_dir, tmp_path):
    out = tmp_path / "eval"
    assert run("--model", tiny_dir, "--tasks", "sentiment,parity", "--levels", "checklist,semantic",
               "--n-per-task", 4, "--mode", "both", "--max-new-tokens", 2, "--align-triples", 4, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = results["models"]["model"]
    assert set(res["modes"]) == {"rank", "generate"}
    assert results["meta"]["levels"] == ["clean", "checklist", "semantic"]
    rank = res["modes"]["rank"]
    for task in ("sentiment", "parity"):
        clean = rank["tasks"][task]["clean"]["accs"]
        cell = rank["tasks"][task]["checklist"]
        assert len(cell["accs"]) == 6 and all(a is None or a in (0, 0.25, 0.5, 0.75, 1) for a in cell["accs"])
        assert cell["pdr"] == [pdr(a, c) for a, c in zip(cell["accs"], clean)]
        # (4 records of each task hold both labels with this seed, so every task has hard negatives)
        assert set(res["alignment"]["tasks"][task]) == {"clean", "checklist", "semantic"}
    assert rank["examples_per_s"] > 0 and rank["unparseable_rate"] == 0
    assert 0 <= res["mode_agreement"] <= 1
    md = (out / "report.md").read_text()
    assert "## model — rank" in md and "| task | clean | checklist | semantic |" in md and "examples/s" in md
    assert "## Representation alignment" in md


def test_baseline_side_by_side_with_external_files(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({
        "clean": {"sst2": ["Answer 'positive' or 'negative':", "Is this 'positive' or 'negative'?"],
                  "cola": ["'acceptable' or 'unacceptable'?"]},
        "deepwordbug": {"sst2": ["Anwser 'positive' or 'negative':", "Is tihs 'positive' or 'negtive'?"]},
    }))
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"task": "sentiment", "input": x, "label": y}) + "\n"
                               for x, y in [("Great.", "positive"), ("Awful.", "negative"), ("Fun!", "positive")]))
    out = tmp_path / "eval"
    assert run("--model", tiny_dir, "--baseline-model", tiny_dir, "--instructions", prompts, "--records", records,
               "--align-triples", 0, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["baseline", "coin"]
    a, b = (results["models"][m]["modes"]["rank"] for m in ("baseline", "coin"))
    assert a["tasks"] == b["tasks"]  # the same weights give the same numbers
    assert a["tasks"]["sentiment"]["deepwordbug"]["accs"][1] is None  # 'negtive': reported and skipped
    problems = "\n".join(results["meta"]["problems"])
    assert "unknown task 'cola'" in problems and "deepwordbug/sst2[1]" in problems
    md = (out / "report.md").read_text()
    assert "## coin vs baseline" in md and "## Problems" in md


@pytest.mark.parametrize("line, message", [
    ({"task": "qqp", "input": "x", "label": "equivalent"}, "task 'qqp' has no label words"),
    ({"task": "parity", "input": "3", "label": "three"}, "label 'three' is not a label word of 'parity'"),
    ({"task": "parity", "input": 3, "label": "odd"}, "missing or non-string field(s) input"),
])
def test_bad_records_are_reported_with_their_line(tiny_dir, tmp_path, capsys, line, message):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"task": "parity", "input": "4", "label": "even"}) + "\n" + json.dumps(line) + "\n")
    assert run("--model", tiny_dir, "--records", records, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"{records}:2:" in err and message in err


def test_module_entry_point_and_cli_dispatch(capsys):
    done = subprocess.run([sys.executable, "-m", "coin_ds.eval", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--instructions" in done.stdout and "--mode" in done.stdout
    from coin_ds.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "--help"])
    assert e.value.code == 0 and "--baseline-model" in capsys.readouterr().out


@pytest.mark.slow
def test_two_ranks_give_the_one_process_results(tiny_dir, tmp_path):
    args = ["--model", tiny_dir, "--tasks", "compare,parity", "--levels", "checklist", "--n-per-task", 4,
            "--align-triples", 2, "--no-progress"]
    assert main([*map(str, args), "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "coin_ds.eval", *map(str, args), "--out", str(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["meta"]["ranks"] == 2
    r1, r2 = one["models"]["model"], two["models"]["model"]
    assert r1["modes"]["rank"]["tasks"] == r2["modes"]["rank"]["tasks"]
    assert r1["alignment"]["tasks"].keys() == r2["alignment"]["tasks"].keys()
    for task, by_level in r1["alignment"]["tasks"].items():
        for level, cell in by_level.items():
            assert r2["alignment"]["tasks"][task][level]["alignment"] == pytest.approx(cell["alignment"], abs=1e-5)


def test_waves_cover_every_unit_once_in_order():
    records = {"a": [{}] * 30, "b": [{}] * 10}
    units = [("a", "i1"), ("b", "i1"), ("a", "i2"), ("b", "i2"), ("a", "i3")]
    waves = unit_waves(units, records, prompts_per_wave=35)
    assert waves == [[("a", "i1"), ("b", "i1")], [("a", "i2"), ("b", "i2")], [("a", "i3")]]
    assert unit_waves(units, records, prompts_per_wave=1) == [[u] for u in units]


def test_waves_hand_each_unit_its_own_answers(monkeypatch):
    """Waves mix instructions and tasks in one batch; each answer must land on its own unit and record. The models
    are replaced by functions of the prompt text, so any mix-up shows."""
    from coin_ds.data.synthetic import TASKS, generate_eval_records
    from coin_ds.eval import run as eval_run

    def answer(prompt: str, words: list[str]) -> str:
        return words[len(prompt) % len(words)]

    def fake_rank(model, tok, groups, batch_size):
        return [[answer(p, words) for p in prompts] for prompts, words in groups]

    def fake_generate(model, tok, prompts, batch_size, max_new_tokens):
        return [answer(p, ["even", "odd"] if "number" in p else ["positive", "negative"]) + " because" for p in prompts]

    monkeypatch.setattr(eval_run, "rank_predict_groups", fake_rank)
    monkeypatch.setattr(eval_run, "generate_outputs", fake_generate)
    records = {t: generate_eval_records(7, seed=3, tasks=[t]) for t in ("sentiment", "parity")}
    words = {t: list(TASKS[t].label_words) for t in records}
    units = [(t, ins) for t in records for ins in TASKS[t].templates[:3]]
    out = eval_run.score_units(None, None, units, records, words, ["rank", "generate"], "coin", 4, 3, progress=False)
    want = {(t, ins): [answer(render_prompt("coin", ins, r["input"]), words[t]) for r in records[t]] for t, ins in units}
    assert len({a for v in want.values() for a in v}) == 4  # the answers vary
    for mode in ("rank", "generate"):
        assert out[mode]["pred"] == want and out[mode]["examples"] == 7 * len(units)
