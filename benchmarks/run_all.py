"""Run every benchmark, print one goal table, write benchmarks/results/latest.json (`make bench`).

    python -m benchmarks.run_all [--quick] [--only step_cost,padding,...]

Each benchmark runs in its own process (clean memory, its own thread settings) and writes results/<name>.json with
its goal rows; this script collects them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("step_cost", "zero3_memory", "eval_speed", "padding")
GOAL_NAMES = {
    1: "COIN step / plain SFT step (same 3B sequences)",
    2: "one-pass COIN step / official two-pass step",
    3: "training MFU (SmolLM2-135M, seq 256)",
    4: "ZeRO-3 per-rank params + optimizer state, 2 ranks / 1 rank",
    5: "eval examples/s, rank mode / generate mode",
    6: "padding efficiency of the trainer's batches",
}
GOALS = {1: "<= 1.05", 2: "<= 0.8", 3: ">= 0.5", 4: "<= 0.55", 5: ">= 5", 6: ">= 0.9"}


def run(name: str, quick: bool) -> tuple[list[dict], str]:
    """Run one benchmark; its goal rows and a status ('ok', 'missing', 'failed (...)')."""
    if not (ROOT / "benchmarks" / f"{name}.py").exists():
        return [], "missing"
    cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if quick else [])
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, timeout=1200)
    print(f"=== {name}: {time.time() - t0:.0f} s, exit {proc.returncode}", flush=True)
    path = RESULTS / f"{name}.json"
    if proc.returncode != 0 or not path.exists() or path.stat().st_mtime < t0:
        return [], f"failed (exit {proc.returncode})"
    return json.loads(path.read_text()).get("goals", []), "ok"


def table(rows: dict[int, dict], status: dict[int, str]) -> str:
    lines = ["| # | ratio | value | goal | met | spread (per round) | measured on |", "|---|---|---|---|---|---|---|"]
    for i in sorted(GOALS):
        r = rows.get(i)
        if r is None:
            lines.append(f"| {i} | {GOAL_NAMES[i]} | {status[i]} | {GOALS[i]} | - | | |")
        else:
            lines.append(f"| {i} | {r['name']} | {r['value']:.3f} | {r['goal']} | {'yes' if r['met'] else '**no**'} | "
                         f"{r['spread']} | {r['detail']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (5 after 1 warm-up), fewer side lines")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = p.parse_args(argv)
    t0 = time.time()
    rows: dict[int, dict] = {}
    status: dict[int, str] = {i: "not run" for i in GOALS}
    owners = {"step_cost": (1, 2, 3), "zero3_memory": (4,), "eval_speed": (5,), "padding": (6,)}
    for name in args.only.split(","):
        try:
            got, state = run(name, args.quick)
        except subprocess.TimeoutExpired:
            got, state = [], "failed (timeout)"
        for i in owners[name]:
            status[i] = state
        for r in got:
            rows[r["id"]] = r
    text = table(rows, status)
    print("\n" + text)
    print(f"\n{sum(r['met'] for r in rows.values())}/{len(GOALS)} goals met; {time.time() - t0:.0f} s; "
          f"command: make bench{' (--quick)' if args.quick else ''}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "machine": machine(),
        "goals": [rows.get(i, {"id": i, "name": GOAL_NAMES[i], "goal": GOALS[i], "status": status[i]}) for i in GOALS],
        "status": status, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
