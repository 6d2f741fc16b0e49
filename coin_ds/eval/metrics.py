"""Robustness metrics (SPEC §3), pure Python.

Per task and level: the accuracy of each instruction, their mean and population standard deviation (the paper's
numbers), and PromptBench's performance drop rate per instruction, `PDR = 1 − acc_perturbed / acc_clean`, where the
perturbed instruction i is paired with clean instruction i. A skipped instruction is `None` and drops out; a PDR whose
clean accuracy is 0 is undefined (`None`) rather than infinite.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

CLEAN = "clean"


def accuracy(predictions: Sequence[str | None], labels: Sequence[str]) -> float:
    """Fraction of exact matches; a `None` prediction (unparseable answer) is wrong."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of zero examples")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std (ddof=0, as the paper reports) of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.pstdev(present)


def pdr(acc_perturbed: float | None, acc_clean: float | None) -> float | None:
    """1 − acc_perturbed / acc_clean; negative when the perturbation helped; None when undefined."""
    if acc_perturbed is None or acc_clean is None or acc_clean == 0:
        return None
    return 1.0 - acc_perturbed / acc_clean


def level_summary(accs: Sequence[float | None], clean_accs: Sequence[float | None] | None) -> dict:
    """Metrics of one task at one level. `clean_accs[i]` is the clean source of `accs[i]` (None for the clean level)."""
    mean, std = mean_std(accs)
    out = {"accs": list(accs), "mean": mean, "std": std}
    if clean_accs is not None:
        # a level longer than clean has no clean source for its extra instructions: their PDR is undefined
        pdrs = [pdr(a, clean_accs[i] if i < len(clean_accs) else None) for i, a in enumerate(accs)]
        out["pdr"] = pdrs
        out["pdr_mean"] = mean_std(pdrs)[0]
    return out


def summarize(accs: dict[str, dict[str, list[float | None]]]) -> dict:
    """`accs[task][level]` = per-instruction accuracies -> per task × level metrics and per-level averages over tasks.

    Averages over tasks are unweighted (each task counts once, as in the paper's tables)."""
    tasks: dict[str, dict] = {}
    for task, by_level in accs.items():
        clean = by_level.get(CLEAN)
        tasks[task] = {level: level_summary(values, None if level == CLEAN else clean)
                       for level, values in by_level.items() if level == CLEAN or clean is not None}
    levels = list(dict.fromkeys(level for by_level in tasks.values() for level in by_level))
    overall = {}
    for level in levels:
        cells = [by_level[level] for by_level in tasks.values() if level in by_level]
        row = {"mean": mean_std([c["mean"] for c in cells])[0], "std": mean_std([c["std"] for c in cells])[0],
               "tasks": len(cells)}
        if level != CLEAN:
            row["pdr_mean"] = mean_std([c.get("pdr_mean") for c in cells])[0]
        overall[level] = row
    return {"tasks": tasks, "overall": overall}
