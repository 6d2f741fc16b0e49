"""`coin-ds eval` / `python -m coin_ds.eval`: robustness of one or two models to instruction perturbations.

    coin-ds eval --model smollm2 --out runs/eval                          # embedded tasks, generated perturbations
    coin-ds eval --model smollm2 --instructions ../shared/data/coin_prompts/prompts.json --mode both
    coin-ds eval --baseline-model base_dir --model base_dir --adapter runs/coin/adapter   # side by side

Every (task, instruction) pair is a unit of work: all of the task's records are scored under that instruction. With
several ranks (torchrun or the deepspeed launcher) the units are split across ranks, the predictions gathered on rank 0
(gloo), and rank 0 computes the metrics and writes `results.json`, `report.md` and `accuracy.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from coin_ds.data.synthetic import TASKS, generate_eval_records
from coin_ds.eval import report
from coin_ds.eval.instructions import DEFAULT_LEVELS, InstructionError, InstructionSets, generate_sets, load_sets
from coin_ds.eval.metrics import CLEAN, accuracy, summarize
from coin_ds.eval.scoring import (
    MAX_NEW_TOKENS,
    MODES,
    generate_outputs,
    last_token_states,
    parse_answer,
    rank_predict_groups,
)
from coin_ds.prompting import TEMPLATES, render_prompt, resolve_template


class EvalError(ValueError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="coin-ds eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="base model: 'tiny', 'smollm2', a local HF dir (e.g. a merged "
                   "export) or a .gguf file (default: smollm2)")
    p.add_argument("--adapter", help="PEFT adapter directory applied on top of --model")
    p.add_argument("--name", default=None, help="name of --model in the report (default: 'coin' with a baseline, "
                   "else 'model')")
    p.add_argument("--baseline-model", help="a second model evaluated side by side (e.g. the base before COIN)")
    p.add_argument("--baseline-adapter", help="PEFT adapter for --baseline-model")
    p.add_argument("--baseline-name", default="baseline")
    p.add_argument("--records", help="evaluation records JSONL (task, input, label); default: the embedded tasks")
    p.add_argument("--label-words", help="JSON {task: [label words]} for tasks that are not embedded")
    p.add_argument("--tasks", help="comma-separated subset of tasks")
    p.add_argument("--n-per-task", type=int, default=50, help="records per task (generated, or the first N of "
                   "--records; 0: all of --records)")
    p.add_argument("--instructions", help="external instruction sets {level: {task: [instructions]}} (e.g. "
                   "shared/data/coin_prompts/prompts.json); default: perturb the tasks' clean instructions")
    p.add_argument("--levels", help=f"comma-separated perturbation levels (default: {','.join(DEFAULT_LEVELS)}, or "
                   "all levels of --instructions)")
    p.add_argument("--mode", choices=(*MODES, "both"), default="rank")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="generate mode's budget")
    p.add_argument("--align-triples", type=int, default=16,
                   help="(orig, para, neg) triples per task for the alignment metric (0: skip)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward: prompts in generate mode, "
                   "packed rows of several prompts in rank mode")
    p.add_argument("--template", choices=TEMPLATES, default="auto", help="prompt template, as in training")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated records and perturbations")
    p.add_argument("--out", default="runs/eval", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------- inputs
def load_label_words(path: str | None) -> dict[str, list[str]]:
    words = {name: list(task.label_words) for name, task in TASKS.items()}
    if path:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, list) and v and all(isinstance(w, str) for w in v)
                                                 for v in data.values()):
            raise EvalError(f"{path}: expected {{task: [label word, ...]}} with non-empty lists of strings")
        words.update(data)
    return words


def load_records(path: str, label_words: dict[str, list[str]]) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [k for k in ("task", "input", "label") if not isinstance(r.get(k), str)]
            if missing:
                raise EvalError(f"{path}:{n}: missing or non-string field(s) {', '.join(missing)}")
            if r["task"] not in label_words:
                raise EvalError(f"{path}:{n}: task {r['task']!r} has no label words (embedded: "
                                f"{', '.join(sorted(TASKS))}; give others with --label-words)")
            if r["label"] not in label_words[r["task"]]:
                raise EvalError(f"{path}:{n}: label {r['label']!r} is not a label word of {r['task']!r} "
                                f"({', '.join(label_words[r['task']])})")
            records.append({"task": r["task"], "input": r["input"], "label": r["label"]})
    return records


def build_inputs(args: argparse.Namespace) -> tuple[dict[str, list[str]], InstructionSets, dict[str, list[dict]]]:
    """(label words, instruction sets, records by task) restricted to the tasks that have both records and
    instructions; every task dropped for lacking one of them is reported in the sets' problems."""
    label_words = load_label_words(args.label_words)
    wanted = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    levels = [lv.strip() for lv in args.levels.split(",")] if args.levels else None
    if args.instructions:
        sets = load_sets(args.instructions, label_words, levels)
    else:
        clean = {name: list(TASKS[name].templates) for name in (wanted or sorted(TASKS)) if name in TASKS}
        unknown = [t for t in (wanted or []) if t not in TASKS]
        if unknown:
            raise EvalError(f"task(s) {', '.join(unknown)} have no built-in clean instructions; give them with "
                            f"--instructions FILE")
        sets = generate_sets(label_words, clean, levels or DEFAULT_LEVELS, seed=args.seed)
    tasks = [t for t in sets.tasks if wanted is None or t in wanted]
    if args.records:
        all_records = load_records(args.records, label_words)
    else:
        all_records = generate_eval_records(args.n_per_task, args.seed, [t for t in tasks if t in TASKS])
    by_task: dict[str, list[dict]] = {}
    for r in all_records:
        by_task.setdefault(r["task"], []).append(r)
    if args.records and args.n_per_task > 0:
        by_task = {t: rs[:args.n_per_task] for t, rs in by_task.items()}
    for t in sorted(set(by_task) - set(tasks)):
        sets.problems.append(f"records of task {t!r} have no instructions; not evaluated")
    for t in [t for t in tasks if t not in by_task]:
        sets.problems.append(f"task {t!r} has instructions but no records; not evaluated")
    tasks = [t for t in tasks if t in by_task]
    if not tasks:
        raise EvalError("no task has both records and instructions")
    sets.sets = {lv: {t: v for t, v in by_task_sets.items() if t in tasks} for lv, by_task_sets in sets.sets.items()}
    return label_words, sets, {t: by_task[t] for t in tasks}


def load_eval_model(path: str, adapter: str | None, dtype: str):
    from coin_ds.config import ModelConfig
    from coin_ds.modeling import load_model, load_tokenizer

    cfg = ModelConfig(path=path, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------- scoring
def work_units(sets: InstructionSets) -> list[tuple[str, str]]:
    """Distinct (task, instruction) pairs: an instruction shared by two levels (a semantic alternative that is another
    clean template) is scored once."""
    units = {(task, text) for by_task in sets.sets.values() for task, texts in by_task.items() for text in texts
             if text is not None}
    return sorted(units)


def unit_waves(units: list[tuple[str, str]], records: dict[str, list[dict]], prompts_per_wave: int
               ) -> list[list[tuple[str, str]]]:
    """Consecutive units grouped until a group holds at least `prompts_per_wave` prompts: a wave is scored in one go,
    so batches mix instructions and stay full, while memory (one prefix cache per unit) stays bounded."""
    waves: list[list[tuple[str, str]]] = [[]]
    count = 0
    for unit in units:
        if count >= prompts_per_wave:
            waves.append([])
            count = 0
        waves[-1].append(unit)
        count += len(records[unit[0]])
    return [w for w in waves if w]


def score_units(model, tokenizer, units: list[tuple[str, str]], records: dict[str, list[dict]],
                label_words: dict[str, list[str]], modes: list[str], template: str, batch_size: int,
                max_new_tokens: int, progress: bool) -> dict:
    """{mode: {"pred": {(task, instruction): [answer per record]}, "examples": n, "seconds": s,
    "unparseable_examples": [up to 3 raw outputs]}}. Units are scored in waves (`unit_waves`) of >= 4 batches."""
    from tqdm import tqdm

    out = {m: {"pred": {}, "examples": 0, "seconds": 0.0, "unparseable_examples": []} for m in modes}
    bar = tqdm(total=len(units) * len(modes), desc="eval", unit="instr", disable=not progress, file=sys.stderr)
    for mode in modes:
        for wave in unit_waves(units, records, 4 * batch_size):
            prompts = [[render_prompt(template, instruction, r["input"], tokenizer) for r in records[task]]
                       for task, instruction in wave]
            t0 = time.perf_counter()
            if mode == "rank":
                preds = rank_predict_groups(model, tokenizer, [(p, label_words[task]) for p, (task, _) in
                                                               zip(prompts, wave)], batch_size)
            else:
                raw = generate_outputs(model, tokenizer, [x for p in prompts for x in p], batch_size, max_new_tokens)
                preds = []
                for p, (task, _) in zip(prompts, wave):
                    texts, raw = raw[:len(p)], raw[len(p):]
                    preds.append([parse_answer(t, label_words[task]) for t in texts])
                    bad = [t for a, t in zip(preds[-1], texts) if a is None]
                    out[mode]["unparseable_examples"] += bad[:max(0, 3 - len(out[mode]["unparseable_examples"]))]
            out[mode]["seconds"] += time.perf_counter() - t0
            for unit, p, pred in zip(wave, prompts, preds):
                out[mode]["examples"] += len(p)
                out[mode]["pred"][unit] = pred
            bar.set_postfix(mode=mode, task=wave[-1][0])
            bar.update(len(wave))
    bar.close()
    return out


def alignment_units(model, tokenizer, sets: InstructionSets, records: dict[str, list[dict]], tasks: list[str],
                    template: str, n_triples: int, batch_size: int) -> dict:
    """Per task and level: mean cos(orig, para) − mean cos(orig, neg) of last-token states (what COIN optimises).

    orig = clean instruction i + record j (with its answer, as in training), para = the level's instruction i + the
    same record (for the clean level: the next clean instruction, i.e. a COIN positive), neg = clean instruction i +
    another record of the task whose label differs."""
    from coin_ds.data.batching import ViewEncoder
    from coin_ds.data.triples import View
    from coin_ds.loss import alignment

    encoder = ViewEncoder(tokenizer, template, max_length=4096)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, dict] = {}
    for task in tasks:
        clean = sets.sets[CLEAN][task]
        recs = records[task]
        plan = []  # (i, record j, negative record)
        for j, r in enumerate(recs[:n_triples]):
            i = j % len(clean)
            neg = next((x for x in recs[j + 1:] + recs[:j] if x["label"] != r["label"]), None)
            if clean[i] is not None and neg is not None:
                plan.append((i, r, neg))
        if not plan:
            continue

        def states(views: list[View]) -> torch.Tensor:
            return last_token_states(model, [encoder.encode(v).input_ids for v in views], pad, batch_size)

        h_orig = states([View(clean[i], r["input"], r["label"]) for i, r, _ in plan])
        h_neg = states([View(clean[i], n["input"], n["label"]) for i, _, n in plan])
        out[task] = {}
        for level, by_task in sets.sets.items():
            texts = by_task.get(task, [])
            if level == CLEAN:
                texts = [clean[(k + 1) % len(clean)] for k in range(len(clean))]
            keep = [k for k, (i, _, _) in enumerate(plan) if i < len(texts) and texts[i] is not None]
            if not keep:
                continue
            h_para = states([View(texts[plan[k][0]], plan[k][1]["input"], plan[k][1]["label"]) for k in keep])
            a = alignment(h_orig[keep], h_para, h_neg[keep])
            out[task][level] = {**a, "triples": len(keep)}
    return out


# ------------------------------------------------------------------------------------------------------ distributed
def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))  # ranks share the cores
    return dist.get_rank(), dist.get_world_size()


def _gather(obj, rank: int, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts or []


# -------------------------------------------------------------------------------------------------------- assembly
def model_results(parts: list[dict], sets: InstructionSets, records: dict[str, list[dict]], modes: list[str]) -> dict:
    """Merge the ranks' predictions and turn them into metrics for one model."""
    out: dict = {"modes": {}}
    for mode in modes:
        pred = {k: v for p in parts for k, v in p["scores"][mode]["pred"].items()}
        accs: dict[str, dict[str, list[float | None]]] = {}
        unparseable = total = 0
        for level, by_task in sets.sets.items():
            for task, texts in by_task.items():
                labels = [r["label"] for r in records[task]]
                row = []
                for text in texts:
                    if text is None:
                        row.append(None)
                        continue
                    p = pred[(task, text)]
                    row.append(accuracy(p, labels))
                    unparseable += sum(x is None for x in p)
                    total += len(p)
                accs.setdefault(task, {})[level] = row
        seconds = max(p["scores"][mode]["seconds"] for p in parts)
        examples = sum(p["scores"][mode]["examples"] for p in parts)
        out["modes"][mode] = {
            **summarize(accs),
            "examples_scored": examples,
            "seconds": seconds,
            "examples_per_s": examples / seconds if seconds > 0 else None,
            "unparseable_rate": unparseable / total if total else 0.0,
            "unparseable_examples": [x for p in parts for x in p["scores"][mode]["unparseable_examples"]][:3],
        }
    if len(modes) == 2:
        a, b = ({k: v for p in parts for k, v in p["scores"][m]["pred"].items()} for m in modes)
        same = sum(x == y for k in a for x, y in zip(a[k], b[k]))
        out["mode_agreement"] = same / max(1, sum(len(v) for v in a.values()))
    align = {t: v for p in parts for t, v in p["alignment"].items()}
    if align:
        overall = {}
        for level in sets.levels:
            cells = [by_level[level] for by_level in align.values() if level in by_level]
            if cells:
                overall[level] = {k: sum(c[k] for c in cells) / len(cells) for k in ("cos_para", "cos_neg",
                                                                                    "alignment")}
        out["alignment"] = {"tasks": align, "overall": overall}
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    rank, world = _init_distributed()
    try:
        label_words, sets, records = build_inputs(args)
    except (EvalError, InstructionError, ValueError) as e:
        print(f"coin-ds eval: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        for problem in sets.problems:
            print(f"[eval] {problem}", file=sys.stderr)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    models = []
    if args.baseline_model:
        models.append((args.baseline_name, args.baseline_model, args.baseline_adapter))
    models.append((args.name or ("coin" if args.baseline_model else "model"), args.model, args.adapter))
    if len({m[0] for m in models}) != len(models):
        raise SystemExit("coin-ds eval: --name and --baseline-name must differ")

    tasks = list(records)
    units = work_units(sets)
    mine = units[rank::world]
    results: dict = {"models": {}}
    template = None
    for name, path, adapter in models:
        model, tokenizer = load_eval_model(path, adapter, args.dtype)
        template = resolve_template(args.template, tokenizer)
        progress = rank == 0 and not args.no_progress
        if rank == 0:
            print(f"[eval] {name}: {path}{' + ' + adapter if adapter else ''}; {len(units)} instructions x "
                  f"{sum(len(v) for v in records.values()) // len(records)} records/task, {world} rank(s)",
                  file=sys.stderr)
        scores = score_units(model, tokenizer, mine, records, label_words, modes, template, args.batch_size,
                             args.max_new_tokens, progress)
        align = (alignment_units(model, tokenizer, sets, records, tasks[rank::world], template, args.align_triples,
                                 args.batch_size) if args.align_triples > 0 else {})
        parts = _gather({"scores": scores, "alignment": align}, rank, world)
        if rank == 0:
            results["models"][name] = {"path": path, "adapter": adapter, **model_results(parts, sets, records, modes)}
        del model
    if rank != 0:
        return 0
    results["meta"] = {
        "tasks": {t: {"records": len(records[t]), "label_words": label_words[t]} for t in tasks},
        "levels": sets.levels, "instructions": sets.source, "instruction_sets": sets.sets,
        "skipped_instructions": sets.skipped, "problems": sets.problems, "modes": modes, "template": template,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "seed": args.seed, "ranks": world,
        "records": args.records or f"embedded synthetic tasks (seed {args.seed})",
    }
    written = report.write_all(results, Path(args.out))
    print(report.markdown(results))
    print("[eval] wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
