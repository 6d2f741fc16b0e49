"""COIN vs the baseline on a real model: one recipe, three models, one report.

    python -m coin_ds.experiment --config configs/reproduce.yaml      # `make reproduce`
    python -m coin_ds.experiment --config configs/demo_compare.yaml   # the short version `make demo` ends with

From one seed and one augmented training set (the embedded tasks, positives from the perturbation engine) it trains
two LoRA adapters under DeepSpeed ZeRO-3 on several ranks — the **baseline** (continual instruction tuning: L_gen on
orig + para, no contrastive term) and **COIN** (the same plus the contrastive term with hard negatives) — then
evaluates the base model, the baseline and COIN with the robustness evaluator on held-out instances (clean vs the four
perturbation levels, and the paper's own instructions where they match our tasks), and writes one report: a Markdown
table, an accuracy plot, and the training curves. Every stage is skipped when its output already exists, so an
interrupted recipe continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from coin_ds.config import ConfigError, apply_values, nest_key, parse_overrides
from coin_ds.data.records import Record, save_records
from coin_ds.data.synthetic import TASKS, generate_records

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAPER_PROMPTS = ROOT.parent / "shared" / "data" / "coin_prompts" / "prompts.json"
ARMS = ("baseline", "coin")


@dataclass
class ExperimentConfig:
    out_dir: str = "runs/reproduce"
    model: str = "smollm2"
    dtype: str = "bfloat16"
    seed: int = 42
    ranks: int = 2
    tasks: list[str] = field(default_factory=lambda: sorted(TASKS))
    train_per_task: int = 200
    positive_levels: list[str] = field(default_factory=lambda: ["character", "word", "sentence", "semantic"])
    # training (both arms identical except the contrastive term)
    max_steps: int = 150
    micro_batch_size: int = 2
    grad_accum: int = 1
    lr: float = 2e-4
    max_length: int = 160
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    temperature: float = 0.05
    lambda_max: float = 1000.0
    negatives: str = "global"
    # evaluation
    eval_per_task: int = 40
    eval_mode: str = "rank"  # rank | generate | both
    eval_levels: list[str] = field(default_factory=lambda: ["character", "word", "sentence", "semantic"])
    align_triples: int = 16
    paper_prompts: str | None = str(DEFAULT_PAPER_PROMPTS)
    batch_size: int = 64


def load_experiment_config(path: str | None, overrides: list[str]) -> ExperimentConfig:
    cfg = ExperimentConfig()
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
        apply_values(cfg, values, path)
    for key, value in parse_overrides(overrides):
        apply_values(cfg, nest_key(key, value), "command line")
    return cfg


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data -----------------------------------------------------------------------------------------------------------

def augmented_records(cfg: ExperimentConfig) -> tuple[list[Record], dict[str, int]]:
    """The embedded tasks with `paraphrases` from the perturbation engine: one per level per instruction."""
    from coin_ds.perturb import perturb_instruction

    records = generate_records(cfg.train_per_task, cfg.seed, cfg.tasks)
    cache: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for r in records:
        if r.instruction not in cache:
            task = TASKS[r.task]
            alternatives = [t for t in task.templates if t != r.instruction]
            out = []
            for level in cfg.positive_levels:
                got = perturb_instruction(r.instruction, level, label_words=task.label_words,
                                          alternatives=alternatives, k=1, seed=cfg.seed)
                counts[level] = counts.get(level, 0) + len(got)
                out += got
            cache[r.instruction] = out
        r.paraphrases = list(cache[r.instruction])
    return records, counts


# --- training -------------------------------------------------------------------------------------------------------

def arm_config(cfg: ExperimentConfig, arm: str, data_file: Path, out: Path) -> dict:
    contrastive = arm == "coin"
    return {
        "model": {"path": cfg.model, "dtype": cfg.dtype},
        "lora": {"enabled": True, "r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout},
        "data": {"train_file": str(data_file), "max_length": cfg.max_length, "eval_triples": 32},
        "loss": {"contrastive": contrastive, "temperature": cfg.temperature, "lambda_max": cfg.lambda_max,
                 "negatives": cfg.negatives, "hard_negatives": True, "symmetric": True},
        "train": {"output_dir": str(out), "seed": cfg.seed, "max_steps": cfg.max_steps,
                  "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
                  "warmup_ratio": 0.1, "schedule": "linear", "save_every": 0, "keep_checkpoints": 1,
                  "tensorboard": False},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_arm(cfg: ExperimentConfig, arm: str, data_file: Path, out: Path) -> dict:
    run_dir = out / arm
    if (run_dir / "summary.json").exists() and (run_dir / "adapter").exists():
        log(f"{arm}: already trained ({run_dir}), skipping")
        return json.loads((run_dir / "summary.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = run_dir / "run.yaml"
    yaml_path.write_text(yaml.safe_dump(arm_config(cfg, arm, data_file, run_dir), sort_keys=False))
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(cfg.ranks), "--master_port", str(_free_port()),
           str(ROOT / "coin_ds" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
           "--config", str(yaml_path), "--resume"]
    log(f"{arm}: training ({' '.join(cmd[1:])})")
    t0 = time.time()
    with open(run_dir / "train.log", "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{arm}: training failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    log(f"{arm}: trained in {time.time() - t0:.0f} s")
    return json.loads((run_dir / "summary.json").read_text())


# --- evaluation -----------------------------------------------------------------------------------------------------

def write_eval_records(cfg: ExperimentConfig, train: Path, path: Path) -> Path:
    """Held-out instances: drawn from the evaluation stream, excluding every training input."""
    from coin_ds.data.records import load_records
    from coin_ds.data.synthetic import generate_eval_records

    seen = {(r.task, r.input) for r in load_records(train)}
    rows = generate_eval_records(cfg.eval_per_task, cfg.seed, cfg.tasks, exclude_inputs=seen)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def evaluate(cfg: ExperimentConfig, name: str, adapter: Path | None, out: Path, instructions: str | None,
             tasks: list[str]) -> dict:
    from coin_ds.eval.run import main as eval_main

    sub = "paper" if instructions else "generated"
    eval_dir = out / "eval" / sub / name
    if (eval_dir / "results.json").exists():
        return json.loads((eval_dir / "results.json").read_text())
    args = ["--model", cfg.model, "--name", name, "--out", str(eval_dir), "--n-per-task", str(cfg.eval_per_task),
            "--mode", cfg.eval_mode, "--seed", str(cfg.seed), "--batch-size", str(cfg.batch_size),
            "--dtype", cfg.dtype, "--align-triples", str(cfg.align_triples), "--tasks", ",".join(tasks),
            "--records", str(out / "data" / "eval.jsonl"), "--no-progress"]
    if adapter:
        args += ["--adapter", str(adapter)]
    if instructions:
        args += ["--instructions", instructions]
    else:
        args += ["--levels", ",".join(cfg.eval_levels)]
    log(f"eval ({sub}): {name}")
    code = eval_main(args)
    if code:
        raise SystemExit(f"evaluation of {name} failed (exit {code})")
    return json.loads((eval_dir / "results.json").read_text())


def merge(results: list[dict]) -> dict:
    merged = {"models": {}, "meta": results[0]["meta"]}
    for r in results:
        merged["models"].update(r["models"])
    return merged


# --- report ---------------------------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def summary_table(merged: dict, mode: str) -> list[str]:
    """One row per model: mean accuracy ± std per level, mean PDR over the perturbed levels, alignment."""
    levels = merged["meta"]["levels"]
    head = "| model | " + " | ".join(levels) + " | mean PDR | alignment |"
    lines = [head, "|---|" + "---|" * (len(levels) + 2)]
    for name, res in merged["models"].items():
        overall = res["modes"][mode]["overall"]
        cells = [f"{_pct(overall[lv]['mean'])} ± {_pct(overall[lv]['std'])}" if lv in overall else "–"
                 for lv in levels]
        pdrs = [overall[lv]["pdr_mean"] for lv in levels if lv in overall and overall[lv].get("pdr_mean") is not None]
        pdr = sum(pdrs) / len(pdrs) if pdrs else None
        align = res.get("alignment", {}).get("overall", {})
        perturbed = [align[lv]["alignment"] for lv in levels if lv in align and lv != "clean"]
        a = f"{sum(perturbed) / len(perturbed):.4f}" if perturbed else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(pdr)} | {a} |")
    return lines


def training_curves(out: Path, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for arm in ARMS:
        f = out / arm / "metrics.jsonl"
        if f.exists():
            series[arm] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in zip(axes, ("l_gen", "l_ctr", "weight"), ("L_gen", "L_ctr", "w = min(λ, L_gen/L_ctr)")):
        for arm, rows in series.items():
            if key != "l_gen" and arm == "baseline":
                continue  # the baseline has no contrastive term
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=arm, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(cfg: ExperimentConfig, out: Path, generated: dict, paper: dict | None, summaries: dict,
                 wall: float) -> Path:
    from coin_ds.eval import report

    report.write_all(generated, out / "report_generated")
    if paper:
        report.write_all(paper, out / "report_paper")
    curves = training_curves(out, out / "training_curves.png")
    mode = generated["meta"]["modes"][0]
    lines = [
        "# COIN vs baseline", "",
        f"- base model: {cfg.model} ({cfg.dtype}); LoRA r={cfg.lora_r} α={cfg.lora_alpha} on q,k,v,o; "
        f"{cfg.max_steps} steps × {cfg.micro_batch_size} triples × {cfg.ranks} ranks, lr {cfg.lr}, seed {cfg.seed}",
        f"- training data: {cfg.train_per_task} records per task ({', '.join(cfg.tasks)}), positives from the "
        f"perturbation engine ({', '.join(cfg.positive_levels)})",
        f"- evaluation: {cfg.eval_per_task} held-out instances per task, mode {mode}; cells are accuracy % (mean ± "
        "population std over instructions); PDR = mean over perturbed levels of 1 − acc/acc_clean; alignment = "
        "cos(orig, para) − cos(orig, neg) of last-token states, averaged over the perturbed levels",
        f"- wall time of this recipe run: {wall / 60:.1f} min", "",
        "## Embedded tasks, instructions perturbed by our engine", "", *summary_table(generated, mode), "",
    ]
    if paper:
        lines += ["## The paper's own instructions (PromptBench sets; tasks that match ours)", "",
                  *summary_table(paper, paper["meta"]["modes"][0]), ""]
    else:
        lines += ["## The paper's own instructions", "", f"skipped: {cfg.paper_prompts} not found", ""]
    lines += ["## Training", "", "| arm | steps | L_gen start → end | L_ctr start → end | held-out alignment before → "
              "after | wall s |", "|---|---|---|---|---|---|"]
    for arm, s in summaries.items():
        st, en = s.get("start") or {}, s.get("end") or {}
        b, a = s.get("alignment_before") or {}, s.get("alignment_after") or {}
        lines.append(f"| {arm} | {s['steps']} | {st.get('l_gen', 0):.3f} → {en.get('l_gen', 0):.3f} | "
                     f"{st.get('l_ctr', 0):.3f} → {en.get('l_ctr', 0):.3f} | "
                     f"{b.get('alignment', 0):.4f} → {a.get('alignment', 0):.4f} | {s['wall_time_s']} |")
    lines += ["", "Per-task tables: `report_generated/report.md`" + (", `report_paper/report.md`" if paper else "")
              + "; plots: `report_generated/accuracy.png`, `training_curves.png`" if curves else ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(cfg: ExperimentConfig) -> Path:
    t0 = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(asdict(cfg), indent=2))
    data_file = out / "data" / "train.jsonl"
    if not data_file.exists():
        records, counts = augmented_records(cfg)
        save_records(records, data_file)
        log(f"data: {len(records)} records, positives per level (unique instructions): {counts} -> {data_file}")
    write_eval_records(cfg, data_file, out / "data" / "eval.jsonl")
    summaries = {arm: train_arm(cfg, arm, data_file, out) for arm in ARMS}
    models = [("base", None), ("baseline", out / "baseline" / "adapter"), ("coin", out / "coin" / "adapter")]
    generated = merge([evaluate(cfg, name, adapter, out, None, cfg.tasks) for name, adapter in models])
    paper = None
    if cfg.paper_prompts and Path(cfg.paper_prompts).exists():
        from coin_ds.data.synthetic import GLUE_ALIASES

        matching = sorted(set(GLUE_ALIASES.values()) & set(cfg.tasks))
        if matching:
            paper = merge([evaluate(cfg, name, adapter, out, cfg.paper_prompts, matching) for name, adapter in models])
    else:
        log(f"the paper's instructions not found at {cfg.paper_prompts}: skipping that part")
    path = write_report(cfg, out, generated, paper, summaries, time.time() - t0)
    print(path.read_text(), flush=True)
    log(f"report: {path} (wall {(time.time() - t0) / 60:.1f} min)")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coin_ds.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with ExperimentConfig fields")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = load_experiment_config(args.config, rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
