"""Results as files a person reads: `results.json`, `report.md` (Markdown tables) and `accuracy.png` (bars)."""

from __future__ import annotations

import json
from pathlib import Path

from coin_ds.eval.metrics import CLEAN


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell(c: dict) -> str:
    text = f"{_pct(c['mean'])} ± {_pct(c['std'])}"
    if "pdr_mean" in c:
        text += f" (PDR {_pct(c['pdr_mean'])})"
    return text


def accuracy_table(mode_result: dict, levels: list[str]) -> list[str]:
    lines = ["| task | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for task, by_level in mode_result["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(_cell(by_level[lv]) if lv in by_level else "–" for lv in levels) + " |")
    overall = mode_result["overall"]
    lines.append("| **average** | " + " | ".join(f"**{_cell(overall[lv])}**" if lv in overall else "–"
                                                 for lv in levels) + " |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    levels = meta["levels"]
    tasks = ", ".join(f"{t} ({v['records']} records; {'/'.join(v['label_words'])})" for t, v in meta["tasks"].items())
    out = ["# Robustness to instruction perturbations", "",
           f"- tasks: {tasks}", f"- records: {meta['records']}", f"- instructions: {meta['instructions']}",
           f"- prompt template: {meta['template']}; modes: {', '.join(meta['modes'])} (generate: greedy, "
           f"{meta['max_new_tokens']} new tokens, answer = the label word the output starts with)",
           "- cells: accuracy % over the instructions of a level, mean ± population std; PDR % = mean over "
           "instructions of 1 − acc(perturbed)/acc(clean source)"]
    if meta["skipped_instructions"]:
        out.append(f"- skipped instructions: {meta['skipped_instructions']} (see *Problems* below)")
    for name, res in results["models"].items():
        for mode, m in res["modes"].items():
            out += ["", f"## {name} — {mode}", "", *accuracy_table(m, levels), ""]
            speed = m["examples_per_s"]
            line = f"{m['examples_scored']} prompts in {m['seconds']:.1f} s ({speed:.1f} examples/s)" if speed else ""
            if mode == "generate":
                line += f"; unparseable answers: {_pct(m['unparseable_rate'])}%"
                if m["unparseable_examples"]:
                    line += " (e.g. " + ", ".join(repr(x) for x in m["unparseable_examples"]) + ")"
            out.append(line)
        if "mode_agreement" in res:
            out.append(f"rank and generate give the same answer on {_pct(res['mode_agreement'])}% of prompts")
    aligned = {n: r["alignment"]["overall"] for n, r in results["models"].items() if "alignment" in r}
    if aligned:
        out += ["", "## Representation alignment", "",
                "mean cos(orig, para) − mean cos(orig, neg) of last-token states (higher: the model treats a "
                "perturbed instruction like the original, and another input as different); clean = another clean "
                "instruction", "",
                "| model | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
        for name, overall in aligned.items():
            out.append(f"| {name} | " + " | ".join(f"{overall[lv]['alignment']:.4f}" if lv in overall else "–"
                                                   for lv in levels) + " |")
    if len(results["models"]) == 2:
        (a, ra), (b, rb) = results["models"].items()
        out += ["", f"## {b} vs {a} (average accuracy %, difference in points)", "",
                "| mode | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
        for mode in ra["modes"]:
            oa, ob = ra["modes"][mode]["overall"], rb["modes"][mode]["overall"]
            cells = [f"{_pct(oa[lv]['mean'])} → {_pct(ob[lv]['mean'])} ({100 * (ob[lv]['mean'] - oa[lv]['mean']):+.1f})"
                     if lv in oa and lv in ob else "–" for lv in levels]
            out.append(f"| {mode} | " + " | ".join(cells) + " |")
    if meta["problems"]:
        out += ["", "## Problems", ""] + [f"- {p}" for p in meta["problems"]]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> Path:
    """One row per mode, one panel per task plus the average: accuracy by level with std bars, models side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    levels = results["meta"]["levels"]
    models = list(results["models"])
    modes = results["meta"]["modes"]
    panels = list(results["meta"]["tasks"]) + ["average"]
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(3.2 * len(panels), 3.0 * len(modes)), squeeze=False,
                             sharey=True)
    width = 0.8 / len(models)
    for r, mode in enumerate(modes):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            for k, name in enumerate(models):
                m = results["models"][name]["modes"][mode]
                cells = m["overall"] if panel == "average" else m["tasks"][panel]
                means = [100 * (cells[lv]["mean"] or 0) if lv in cells else 0 for lv in levels]
                stds = [100 * (cells[lv]["std"] or 0) if lv in cells else 0 for lv in levels]
                xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(levels))]
                ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
            ax.set_xticks(range(len(levels)))
            ax.set_xticklabels(levels, rotation=35, ha="right", fontsize=8)
            ax.set_ylim(0, 105)
            ax.set_title(f"{panel} ({mode})", fontsize=9)
            if c == 0:
                ax.set_ylabel("accuracy %")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "report.md", out_dir / "accuracy.png"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(results), encoding="utf-8")
    plot(results, paths[2])
    return paths


__all__ = ["CLEAN", "accuracy_table", "markdown", "plot", "write_all"]
