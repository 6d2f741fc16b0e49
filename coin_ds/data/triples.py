"""Records -> COIN triples (orig, para, neg), seeded.

- positive: the record's own `paraphrases`, else another instruction seen for the same task;
- hard negative: another record of the same task with a different input *and* a different output, shown with the
  anchor's instruction (same instruction, another instance: SPEC §1). An explicit pairing (the official CoIN CSV's
  odd rows) takes precedence when given.
A record that gets no positive or no hard negative is counted and reported, never paired with itself.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from coin_ds.data.records import Record


@dataclass(frozen=True)
class View:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Triple:
    orig: View
    para: View
    neg: View
    task: str


@dataclass
class TripleReport:
    records: int = 0
    triples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first few record indices

    def skip(self, reason: str, index: int) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(index)

    def lines(self) -> list[str]:
        out = [f"{self.triples} triples from {self.records} records"]
        for reason, n in sorted(self.skipped.items()):
            out.append(f"skipped {n} record(s): {reason} (e.g. record #{', #'.join(map(str, self.examples[reason]))})")
        return out


def build_triples(records: list[Record], seed: int = 0,
                  explicit_negatives: dict[int, int] | None = None) -> tuple[list[Triple], TripleReport]:
    rng = random.Random(seed)
    report = TripleReport(records=len(records))
    by_task: dict[str, list[int]] = defaultdict(list)
    instructions: dict[str, list[str]] = defaultdict(list)
    for i, r in enumerate(records):
        by_task[r.task].append(i)
        if r.instruction not in instructions[r.task]:
            instructions[r.task].append(r.instruction)
    negative_sources = set((explicit_negatives or {}).values())

    triples = []
    for i, r in enumerate(records):
        if explicit_negatives is not None and i in negative_sources and i not in explicit_negatives:
            continue  # an official hard-negative row: used as the negative of the row above, not an anchor
        positives = r.paraphrases or [s for s in instructions[r.task] if s != r.instruction]
        if not positives:
            report.skip("no positive (no paraphrases and no other instruction for its task)", i)
            continue
        j = (explicit_negatives or {}).get(i)
        if j is None or not _valid_negative(r, records[j]):
            candidates = [k for k in by_task[r.task] if _valid_negative(r, records[k])]
            if not candidates:
                report.skip("no hard negative (no other instance of its task with a different input and output)", i)
                continue
            j = rng.choice(candidates)
        neg = records[j]
        para = rng.choice(positives)
        triples.append(Triple(View(r.instruction, r.input, r.output), View(para, r.input, r.output),
                              View(r.instruction, neg.input, neg.output), r.task))
    report.triples = len(triples)
    return triples, report


def _valid_negative(anchor: Record, other: Record) -> bool:
    return other.task == anchor.task and other.input != anchor.input and other.output != anchor.output


def split_heldout(triples: list[Triple], n_heldout: int, seed: int = 0) -> tuple[list[Triple], list[Triple]]:
    """(train, held-out): a seeded random subset held out for the alignment metric."""
    if n_heldout <= 0:
        return triples, []
    order = list(range(len(triples)))
    random.Random(f"heldout/{seed}").shuffle(order)
    held = set(order[:min(n_heldout, len(triples) // 2)])
    return [t for i, t in enumerate(triples) if i not in held], [t for i, t in enumerate(triples) if i in held]
