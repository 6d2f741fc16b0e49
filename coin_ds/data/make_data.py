"""`coin-ds make-data OUT_DIR`: write the embedded tasks as files, to augment, inspect or train from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coin_ds.data.records import save_records
from coin_ds.data.synthetic import TASKS, generate_eval_records, generate_records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coin-ds make-data", description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--per-task", type=int, default=300, help="training records per task")
    p.add_argument("--eval-per-task", type=int, default=100, help="evaluation records per task")
    p.add_argument("--tasks", default=",".join(sorted(TASKS)), help="comma-separated embedded task names")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; embedded tasks: {', '.join(sorted(TASKS))}")
    train = generate_records(args.per_task, args.seed, tasks)
    save_records(train, out / "train.jsonl")
    seen = {(r.task, r.input) for r in train}
    with open(out / "eval.jsonl", "w", encoding="utf-8") as fh:
        for r in generate_eval_records(args.eval_per_task, args.seed, tasks, exclude_inputs=seen):
            fh.write(json.dumps(r) + "\n")
    labels = {name: list(TASKS[name].label_words) for name in tasks}
    (out / "label_words.json").write_text(json.dumps(labels, indent=2))
    print(f"wrote {len(train)} training records, {args.eval_per_task * len(tasks)} evaluation records and the "
          f"label words of {len(tasks)} task(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
