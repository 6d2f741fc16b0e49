"""Character level (DeepWordBug / TextBugger style): one typo in each of a budgeted fraction of the words.

Operations on a word: `swap` two neighbouring letters, `delete` a letter, `insert` a letter, `qwerty` replace a letter by
a keyboard neighbour, `substitute` replace a letter by a random one (DeepWordBug), `homoglyph` replace a letter by a
look-alike from another script (TextBugger's visual attack). Label words and words shorter than `min_len` are never
touched, and each touched word gets exactly one operation, so the edit distance per word is at most 2 (a swap).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

from coin_ds.perturb.common import budget, distinct, replace_spans, word_spans

OPS = ("swap", "delete", "insert", "qwerty", "homoglyph")
DEEPWORDBUG_OPS = ("swap", "delete", "insert", "substitute")
TEXTBUGGER_OPS = ("swap", "delete", "insert", "homoglyph")

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _qwerty_neighbours() -> dict[str, str]:
    pos = {c: (r, i) for r, row in enumerate(_ROWS) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in pos.items():
        near = [d for d, (r2, i2) in pos.items() if d != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1]
        out[c] = "".join(sorted(near))
    return out


QWERTY = _qwerty_neighbours()
# Latin letters and Cyrillic/Greek look-alikes that render (almost) identically.
HOMOGLYPHS = {"a": "а", "c": "с", "e": "е", "i": "і", "j": "ј", "o": "о", "p": "р", "s": "ѕ", "x": "х", "y": "у",
              "A": "А", "B": "В", "C": "С", "E": "Е", "H": "Н", "I": "І", "K": "К", "M": "М", "O": "О", "P": "Р",
              "T": "Т", "X": "Х", "Y": "Ү"}


def _keep_case(src: str, new: str) -> str:
    return new.upper() if src.isupper() else new


def edit_word(word: str, op: str, rng: random.Random, alphabet: str = string.ascii_lowercase) -> str | None:
    """Apply one operation to a word; None when the operation cannot change this word."""
    n = len(word)
    if op == "swap":
        spots = [i for i in range(n - 1) if word[i] != word[i + 1]]
        if not spots:
            return None
        i = rng.choice(spots)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "delete":
        i = rng.randrange(n)
        return word[:i] + word[i + 1:]
    if op == "insert":
        i = rng.randrange(n + 1)
        return word[:i] + rng.choice(alphabet) + word[i:]
    if op == "qwerty":
        spots = [i for i, c in enumerate(word) if c.lower() in QWERTY]
        if not spots:
            return None
        i = rng.choice(spots)
        return word[:i] + _keep_case(word[i], rng.choice(QWERTY[word[i].lower()])) + word[i + 1:]
    if op == "substitute":
        i = rng.randrange(n)
        choices = [c for c in alphabet if c != word[i]]
        return word[:i] + rng.choice(choices) + word[i + 1:]
    if op == "homoglyph":
        spots = [i for i, c in enumerate(word) if c in HOMOGLYPHS]
        if not spots:
            return None
        i = rng.choice(spots)
        return word[:i] + HOMOGLYPHS[word[i]] + word[i + 1:]
    raise ValueError(f"unknown character operation {op!r}; known: {', '.join(OPS + ('substitute',))}")


def perturb_once(instruction: str, rng: random.Random, *, label_words: Sequence[str] = (), rate: float = 0.4,
                 ops: Sequence[str] = OPS, min_len: int = 3, alphabet: str = string.ascii_lowercase) -> str | None:
    """One perturbed instruction: `budget(words, rate)` eligible words get one random operation each."""
    spans = word_spans(instruction, label_words)
    eligible = [(s, e) for s, e, protected in spans
                if not protected and e - s >= min_len and instruction[s:e].isalpha()]
    if not eligible:
        return None
    chosen = rng.sample(eligible, min(len(eligible), budget(len(spans), rate)))
    edits = {}
    for s, e in chosen:
        word = instruction[s:e]
        # an operation that cannot apply to this word (no homoglyph letter, ...) falls back to another one
        for op in rng.sample(list(ops), len(ops)):
            new = edit_word(word, op, rng, alphabet)
            if new is not None and new != word:
                edits[(s, e)] = new
                break
    return replace_spans(instruction, edits)


def perturb(instruction: str, rng: random.Random, *, k: int = 1, label_words: Sequence[str] = (),
            rate: float = 0.4, ops: Sequence[str] = OPS, min_len: int = 3,
            alphabet: str = string.ascii_lowercase) -> list[str]:
    """Up to k distinct character-level perturbations of `instruction` (never the original)."""
    return distinct(lambda: perturb_once(instruction, rng, label_words=label_words, rate=rate, ops=ops,
                                         min_len=min_len, alphabet=alphabet), instruction, k)
