"""Examples/s of the two scoring modes on the same prompts (SmolLM2-135M-Instruct by default).

    python -m benchmarks.eval_speed [--model smollm2] [--n 32] [--batch-size 16]

Prints both speeds and the ratio rank ÷ generate (goal: ≥ 5x) and writes benchmarks/results/eval_speed.json. Both modes
see identical prompts: the embedded sentiment task under each of its clean instructions, as `coin-ds eval` renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from coin_ds.data.synthetic import TASKS, generate_eval_records
from coin_ds.eval.run import load_eval_model
from coin_ds.eval.scoring import generate_predict, rank_predict
from coin_ds.prompting import render_prompt, resolve_template


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n", type=int, default=32, help="records per instruction")
    p.add_argument("--instructions", type=int, default=2, help="how many of the task's clean instructions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's dtype, both modes")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_speed.json"))
    args = p.parse_args()

    model, tok = load_eval_model(args.model, None, args.dtype)
    task = TASKS["sentiment"]
    records = generate_eval_records(args.n, seed=0, tasks=["sentiment"])
    groups = [[render_prompt("auto", ins, r["input"], tok) for r in records]
              for ins in task.templates[:args.instructions]]
    words = list(task.label_words)
    rank_predict(model, tok, groups[0][:2], words)  # warm-up (allocator, lazy init) outside the timings
    timings = {}
    for mode in ("rank", "generate"):
        t0 = time.perf_counter()
        correct = 0
        for prompts in groups:
            pred = (rank_predict(model, tok, prompts, words, args.batch_size) if mode == "rank"
                    else generate_predict(model, tok, prompts, words, args.batch_size)[0])
            correct += sum(a == r["label"] for a, r in zip(pred, records))
        seconds = time.perf_counter() - t0
        n = sum(len(g) for g in groups)
        timings[mode] = {"examples": n, "seconds": seconds, "examples_per_s": n / seconds, "accuracy": correct / n}
        print(f"{mode:>9}: {n} prompts in {seconds:.1f} s = {n / seconds:.2f} examples/s (accuracy {correct / n:.2f})")
    ratio = timings["rank"]["examples_per_s"] / timings["generate"]["examples_per_s"]
    print(f"rank / generate = {ratio:.1f}x (goal >= 5x)")
    result = {"model": args.model, "dtype": args.dtype, "template": resolve_template("auto", tok), "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "modes": timings, "ratio_rank_over_generate": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
