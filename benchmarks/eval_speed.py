"""Goal 5: evaluation examples/s, rank mode ÷ generate mode, on the same model, prompts and batch size.

    python -m benchmarks.eval_speed [--model smollm2] [--dtype float32] [--n 50] [--batch-size 64] [--quick]

The workload is what `coin-ds eval` runs by default: every embedded task's held-out records (`--n` per task, the CLI's
`--n-per-task` default) under the task's first clean instruction, rendered with the model's template and scored by
`coin_ds.eval.run.score_units` (the CLI's own function) in each mode. Each (mode, task) call is one variant; variants
run in rotation, 1 warm-up round + `--reps` rounds, and the ratio is of the median seconds per round.

The ratio depends on the prompts' shape, so it is printed per task next to each prompt's own token count: rank mode
runs only a prompt's tokens after the instruction's shared prefix (plus the prefix once), generate mode runs the whole
prompt and then decodes `MAX_NEW_TOKENS` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.common import fmt_times, goal, interleaved, pick_device, ratio, write
from coin_ds.data.synthetic import TASKS, generate_eval_records
from coin_ds.eval.run import load_eval_model, score_units
from coin_ds.eval.scoring import MAX_NEW_TOKENS, encode_prompts, shared_prefix_len
from coin_ds.prompting import render_prompt, resolve_template

MODES = ("rank", "generate")


def prompt_shape(tok, template: str, instruction: str, records: list[dict]) -> dict:
    ids = encode_prompts(tok, [render_prompt(template, instruction, r["input"], tok) for r in records])
    shared = shared_prefix_len(ids)
    return {"prompt_tokens": statistics.mean(len(x) for x in ids), "shared_prefix": shared,
            "own_tokens": statistics.mean(len(x) - shared for x in ids)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's dtype, both modes")
    p.add_argument("--n", type=int, default=50, help="records per task (coin-ds eval --n-per-task)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward, both modes (coin-ds eval default)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated embedded tasks (default: all)")
    p.add_argument("--per-task", action="store_true", help="also time each task alone (one instruction per call)")
    p.add_argument("--quick", action="store_true", help="3 rounds of 24 records per task")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.n = 3, 24

    device = pick_device()
    model, tok = load_eval_model(args.model, None, args.dtype)
    model.to(device)
    template = resolve_template("auto", tok)
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        p.error(f"unknown task(s) {unknown}; embedded: {', '.join(TASKS)}")
    records = {t: generate_eval_records(args.n, seed=0, tasks=[t]) for t in tasks}
    units = {t: (t, TASKS[t].templates[0]) for t in tasks}
    words = {t: list(TASKS[t].label_words) for t in tasks}
    preds: dict[tuple[str, str], list] = {}

    def call(mode: str, tasks: list[str]):
        def run():
            got = score_units(model, tok, [units[t] for t in tasks], records, words, [mode], template,
                              args.batch_size, MAX_NEW_TOKENS, progress=False)
            preds.update({(mode, t): got[mode]["pred"][units[t]] for t in tasks})
        return run

    variants = {m: call(m, tasks) for m in MODES}  # the CLI's call: all units, scored in waves
    if args.per_task:
        variants |= {f"{m}:{t}": call(m, [t]) for m in MODES for t in tasks}
    times = interleaved(variants, reps=args.reps, warmup=1, device=device)
    print(fmt_times(times))
    overall = ratio(times, "generate", "rank")

    per_task = {}
    print(f"\n  {'task':<10}{'prompt tok':>11}{'own tok':>9}{'rank acc':>10}{'gen acc':>9}"
          + (f"{'rank ex/s':>11}{'gen ex/s':>10}{'ratio':>7}" if args.per_task else ""))
    for t in tasks:
        shape = prompt_shape(tok, template, units[t][1], records[t])
        acc = {m: statistics.mean(a == rec["label"] for a, rec in zip(preds[(m, t)], records[t])) for m in MODES}
        per_task[t] = {**shape, "accuracy": acc}
        line = f"  {t:<10}{shape['prompt_tokens']:>11.1f}{shape['own_tokens']:>9.1f}{acc['rank']:>10.2f}{acc['generate']:>9.2f}"
        if args.per_task:
            speed = {m: args.n / statistics.median(times[f"{m}:{t}"]) for m in MODES}
            per_task[t] |= {"examples_per_s": speed, "ratio": ratio(times, f"generate:{t}", f"rank:{t}")["value"]}
            line += f"{speed['rank']:>11.1f}{speed['generate']:>10.1f}{per_task[t]['ratio']:>7.2f}"
        print(line)
    n_all = args.n * len(tasks)
    speeds = {m: n_all / statistics.median(times[m]) for m in MODES}
    print(f"\n  all tasks: rank {speeds['rank']:.1f} examples/s, generate {speeds['generate']:.1f} examples/s, "
          f"rank / generate = {overall['value']:.2f}x (per round {overall['round_min']:.2f}..{overall['round_max']:.2f};"
          f" goal >= 5)")
    detail = (f"{args.model} {args.dtype}, {len(tasks)} tasks x {args.n} records, batch {args.batch_size}, "
              f"{args.reps} rounds")
    path = write("eval_speed", {
        "config": vars(args) | {"template": template, "max_new_tokens": MAX_NEW_TOKENS},
        "seconds": times, "examples_per_s": speeds, "per_task": per_task,
        "goals": [goal(5, "eval examples/s, rank mode / generate mode", overall, ">=", 5, detail)]})
    print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
