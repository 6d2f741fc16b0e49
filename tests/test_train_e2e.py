"""End to end: `deepspeed --num_gpus 2 coin_ds/train.py --deepspeed ds_configs/zero3.json` on a tiny config."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from conftest import DEEPSPEED, ROOT, subprocess_env

TINY = ["model.tiny_hidden_size=64", "model.tiny_layers=2", "data.synthetic_per_task=80", "data.eval_triples=16",
        "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_ratio=0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, *extra: str, resume: bool = False, timeout: int = 300, port: int | None = None
           ) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port or free_port()), str(ROOT / "coin_ds" / "train.py"),
           "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), *(["--resume"] if resume else []),
           *TINY, f"train.output_dir={out}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_rank_zero3_lowers_loss_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = launch(out, "train.max_steps=24", "train.save_every=8")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first = sum(r["l_gen"] for r in rows[:4]) / 4
    last = sum(r["l_gen"] for r in rows[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 24
    assert summary["alignment_after"]["triples"] == 16
    assert "COIN training summary" in proc.stdout and "held-out alignment" in proc.stdout
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000024"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000016", "step_0000024"]  # keep_checkpoints=2
    assert (out / "final_model" / "model.safetensors").exists()

    proc = launch(out, "train.max_steps=30", resume=True)
    assert "[resume] from" in proc.stdout and "at step 24" in proc.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))  # continued at 25, not restarted at 1
    assert (ckpt / "latest").read_text().strip() == "step_0000030"


@pytest.mark.slow
def test_a_cpu_run_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU allreduce keeps a 69 MB buffer per rank in /dev/shm and never removes it; the trainer does."""
    import os
    from pathlib import Path

    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    port = free_port()
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"
    launch(tmp_path / "run", "train.max_steps=2", port=port)
    assert sorted(p.name for p in Path("/dev/shm").glob(pattern)) == []
