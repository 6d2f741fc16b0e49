"""Instruction perturbations at four levels (SPEC §2): positives for COIN and attacks for robustness evaluation.

    perturb_instruction("Classify the review as 'positive' or 'negative'.", "char", label_words=["positive", "negative"],
                        k=3, seed=0)

Every level is a pure function of the instruction and a `random.Random` seeded from `seed` (and the level), so the same
call always gives the same output. Label words are never edited. The result never contains the original and may hold
fewer than k items when the instruction does not allow k distinct perturbations.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from coin_ds.perturb import character, semantic, sentence, word

LEVELS = ("character", "word", "sentence", "semantic")

# alias -> (level, default options); the attack names select the matching variant of their level
ALIASES: dict[str, tuple[str, dict]] = {
    "character": ("character", {}),
    "char": ("character", {}),
    "deepwordbug": ("character", {"ops": character.DEEPWORDBUG_OPS, "alphabet": character.string.ascii_letters}),
    "textbugger": ("character", {"ops": character.TEXTBUGGER_OPS}),
    "word": ("word", {}),
    "textfooler": ("word", {}),
    "bertattack": ("word", {}),
    "sentence": ("sentence", {}),
    "checklist": ("sentence", {"kinds": ("checklist",)}),
    "stresstest": ("sentence", {"kinds": ("stresstest",)}),
    "semantic": ("semantic", {}),
    "paraphrase": ("semantic", {}),
}

_FUNCS = {"character": character.perturb, "word": word.perturb, "sentence": sentence.perturb,
          "semantic": semantic.perturb}


def resolve_level(name: str) -> tuple[str, dict]:
    """The canonical level of a level name or alias, with the alias's default options."""
    key = name.strip().lower()
    if key not in ALIASES:
        raise ValueError(f"unknown perturbation level {name!r}; use one of {', '.join(ALIASES)}")
    level, preset = ALIASES[key]
    return level, dict(preset)


def perturb_instruction(instruction: str, level: str, *, label_words: Sequence[str] = (),
                        alternatives: Sequence[str] = (), k: int = 1, seed: int = 0, **options) -> list[str]:
    """Up to k distinct perturbed instructions (never the original), deterministic by seed.

    `alternatives`: other human-written templates of the same task (the semantic level picks among them).
    `options` go to the level's function, e.g. `rate=0.2` (character, word), `ops=(...)` (character),
    `synonyms={...}` (word), `kinds=("checklist",)`, `placement="promptbench"` (sentence), `paraphraser=...` (semantic).
    """
    name, opts = resolve_level(level)
    opts.update(options)
    if name == "semantic":
        opts["alternatives"] = alternatives
    # a string seed is hashed by random.Random deterministically (unlike hash()), and the level keeps streams apart
    rng = random.Random(f"coin_ds/perturb/{name}/{seed}")
    return _FUNCS[name](instruction, rng, k=k, label_words=tuple(label_words), **opts)


__all__ = ["LEVELS", "ALIASES", "resolve_level", "perturb_instruction"]
