"""`coin-ds augment IN OUT`: fill each record's `paraphrases` with perturbed instructions.

    coin-ds augment train.jsonl train.aug.jsonl --levels char,word,sentence,semantic --per-instruction 2 --seed 0

IN is JSONL (or CSV / Parquet / a `datasets` directory); OUT is JSONL, one line per input record, in order. Existing
paraphrases are kept and the new ones appended. Per task, the label words are the embedded task's (when the task is
one of ours) or else the task's distinct short outputs, and the semantic level draws from the task's other instructions
and paraphrases in IN. Record i is perturbed with a seed made of --seed and i, so a resumed run writes exactly what an
uninterrupted one would: if OUT exists, its complete lines are checked against IN (same task, instruction, input,
output, in order), a torn last line is dropped, and the run continues after them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from coin_ds.data.records import RecordError, iter_jsonl, load_records, record_from_dict
from coin_ds.data.synthetic import GLUE_ALIASES, TASKS
from coin_ds.perturb import LEVELS, perturb_instruction, resolve_level
from coin_ds.perturb.word import WordNetMissing

_KEYS = ("task", "instruction", "input", "output")
MAX_LABELS = 20  # a task with more distinct outputs is generative: it has no label words to protect


def _rows(path: Path) -> Iterator[tuple[int | None, dict]]:
    """(line, record dict) for every record of IN, validated; JSONL is streamed, other formats are loaded."""
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        for line, obj in iter_jsonl(path):
            rec = record_from_dict(obj, path, line)
            yield line, {**obj, **rec.to_dict()}
    else:
        for rec in load_records(path):
            yield None, rec.to_dict()


def task_context(path: Path) -> tuple[int, dict[str, list[str]], dict[str, list[str]]]:
    """First pass: record count, label words per task, and every instruction wording per task."""
    n = 0
    outputs: dict[str, set[str]] = defaultdict(set)
    wordings: dict[str, dict[str, None]] = defaultdict(dict)  # a dict keeps first-seen order, unlike a set
    for _, row in _rows(path):
        n += 1
        outputs[row["task"]].add(row["output"].strip())
        for text in [row["instruction"], *row["paraphrases"]]:
            wordings[row["task"]][text] = None
    labels = {}
    for task, outs in outputs.items():
        known = TASKS.get(GLUE_ALIASES.get(task, task))
        if known is not None:
            labels[task] = list(known.label_words)
        elif len(outs) <= MAX_LABELS and all(len(o.split()) <= 3 for o in outs):
            labels[task] = sorted(outs)
        else:
            labels[task] = []
        if known is not None:
            for t in known.templates:
                wordings[task][t] = None
    return n, labels, {t: list(w) for t, w in wordings.items()}


def resume_point(out: Path, in_path: Path) -> int:
    """How many lines of OUT are complete and match IN; a torn last line is cut off."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(out, "r+b") as fh:
            fh.truncate(keep)
    done = data[:keep].decode("utf-8").splitlines()
    if not done:
        return 0
    rows = _rows(in_path)
    for i, text in enumerate(done):
        try:
            written = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(out, i + 1, None, f"OUT is not ours to resume: malformed JSON ({e.msg})") from None
        try:
            _, row = next(rows)
        except StopIteration:
            raise RecordError(out, i + 1, None, "OUT has more lines than IN has records; use --overwrite") from None
        for key in _KEYS:
            if written.get(key) != row[key]:
                raise RecordError(out, i + 1, key, "OUT does not continue IN (differs from the record at the same "
                                                   "position); use --overwrite or another OUT")
    return len(done)


class _PooledParaphraser:
    """Generates a model's candidates once per distinct instruction; each record then draws from that pool."""

    def __init__(self, paraphraser, seed: int, pool_size: int = 8):
        self.paraphraser, self.seed, self.pool_size = paraphraser, seed, pool_size
        self.pools: dict[str, list[str]] = {}

    def __call__(self, instruction: str, rng: random.Random, n: int) -> list[str]:
        if instruction not in self.pools:
            gen_rng = random.Random(f"coin_ds/augment/model/{self.seed}/{instruction}")
            self.pools[instruction] = self.paraphraser(instruction, gen_rng, max(n, self.pool_size))
        pool = list(self.pools[instruction])
        rng.shuffle(pool)
        return pool[:n]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="coin-ds augment", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, help="records: .jsonl, .csv, .parquet or a datasets directory")
    ap.add_argument("output", type=Path, help="JSONL to write (appended to and resumed if it exists)")
    ap.add_argument("--levels", default=",".join(LEVELS),
                    help="comma-separated levels or aliases (char, word, sentence, semantic, deepwordbug, ...)")
    ap.add_argument("--per-instruction", "-k", type=int, default=1, help="new paraphrases per record and level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=None, help="fraction of words touched (character and word levels)")
    ap.add_argument("--model", choices=("none", "smollm2"), default="none",
                    help="semantic level: fill up with filtered paraphrases from a local model")
    ap.add_argument("--overwrite", action="store_true", help="start OUT afresh instead of resuming")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        levels = [(name, *resolve_level(name)) for name in args.levels.split(",") if name.strip()]
    except ValueError as e:
        print(f"coin-ds augment: error: {e}", file=sys.stderr)
        return 2
    if args.per_instruction < 1:
        print("coin-ds augment: error: --per-instruction must be at least 1", file=sys.stderr)
        return 2
    paraphraser = None
    if args.model == "smollm2" and any(level == "semantic" for _, level, _ in levels):
        from coin_ds.perturb.semantic import ModelParaphraser

        paraphraser = _PooledParaphraser(ModelParaphraser.smollm2(), args.seed)

    try:
        n, labels, wordings = task_context(args.input)
        if args.overwrite and args.output.exists():
            args.output.unlink()
        done = resume_point(args.output, args.input)
        added: Counter[str] = Counter()
        short: Counter[str] = Counter()  # records that got fewer than K at a level
        args.output.parent.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm

        with open(args.output, "a", encoding="utf-8") as fh, \
                tqdm(total=n, initial=done, disable=args.quiet, unit="rec", desc="augment") as bar:
            for i, (_, row) in enumerate(_rows(args.input)):
                if i < done:
                    continue
                new: list[str] = []
                for name, level, _ in levels:
                    opts = {}
                    if args.rate is not None and level in ("character", "word"):
                        opts["rate"] = args.rate
                    if level == "semantic" and paraphraser is not None:
                        opts["paraphraser"] = paraphraser
                    got = perturb_instruction(row["instruction"], name, label_words=labels[row["task"]],
                                              alternatives=[w for w in wordings[row["task"]]
                                                            if w not in row["paraphrases"]],
                                              k=args.per_instruction,
                                              seed=args.seed * 1_000_003 + i, **opts)
                    got = [g for g in got if g not in new and g not in row["paraphrases"]]
                    added[name] += len(got)
                    short[name] += len(got) < args.per_instruction
                    new.extend(got)
                row["paraphrases"] = row["paraphrases"] + new
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
                bar.update(1)
    except (RecordError, WordNetMissing) as e:
        print(f"coin-ds augment: error: {e}", file=sys.stderr)
        return 2
    resumed = f" ({done} already in OUT)" if done else ""
    print(f"augment: {n} records{resumed} -> {args.output}", file=sys.stderr)
    for name, _, _ in levels:
        print(f"  {name:<12} +{added[name]:>7} paraphrases   {short[name]:>6} records got fewer than "
              f"{args.per_instruction}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
