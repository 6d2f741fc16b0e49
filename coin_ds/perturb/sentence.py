"""Sentence level: append a distracting suffix that carries no meaning.

- `checklist` (CheckList, as used by PromptBench): a random 10-character string of letters and digits.
- `stresstest` (StressTest): tautologies such as "and true is true".

`placement="end"` (default) appends after the instruction, so the original is an exact prefix of the result.
`placement="promptbench"` reproduces the paper's evaluation set: the suffix goes before a final ':' or '.', and the
result ends with that mark and one space ("... 'negative' Iyk1lJt8yw: ").
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

from coin_ds.perturb.common import distinct

KINDS = ("checklist", "stresstest")
TAUTOLOGIES = ("and true is true", "and false is not true", " ".join(["and true is true"] * 5))
_CHARS = string.ascii_letters + string.digits


def checklist_suffix(rng: random.Random, length: int = 10) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(length))


def attach(instruction: str, suffix: str, placement: str = "end") -> str:
    if placement == "end":
        sep = "" if instruction[-1:].isspace() else " "
        return instruction + sep + suffix
    if placement == "promptbench":
        body = instruction.rstrip()
        mark = ""
        if body[-1:] in (":", "."):
            body, mark = body[:-1], body[-1]
        return f"{body} {suffix}{mark} "
    raise ValueError(f"unknown placement {placement!r}; use 'end' or 'promptbench'")


def perturb_once(instruction: str, rng: random.Random, *, kinds: Sequence[str] = KINDS, placement: str = "end",
                 length: int = 10) -> str:
    kind = rng.choice(list(kinds))
    if kind == "checklist":
        suffix = checklist_suffix(rng, length)
    elif kind == "stresstest":
        suffix = rng.choice(TAUTOLOGIES)
    else:
        raise ValueError(f"unknown sentence kind {kind!r}; known: {', '.join(KINDS)}")
    return attach(instruction, suffix, placement)


def perturb(instruction: str, rng: random.Random, *, k: int = 1, label_words: Sequence[str] = (),
            kinds: Sequence[str] = KINDS, placement: str = "end", length: int = 10) -> list[str]:
    """Up to k distinct suffixed instructions. Label words are untouched because nothing of the original changes."""
    del label_words  # accepted for a uniform signature; a suffix never edits the original text
    return distinct(lambda: perturb_once(instruction, rng, kinds=kinds, placement=placement, length=length),
                    instruction, k)
