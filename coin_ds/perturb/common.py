"""Helpers shared by the perturbation levels: word spans, label-word protection, distinct outputs."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# A "word" is a run of letters, digits or underscores, so that a label word written 'not_equivalent' is one token.
WORD_RE = re.compile(r"\w+")


def protected_spans(text: str, label_words: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of a label word: these are never edited."""
    spans = []
    for word in label_words:
        word = word.strip()
        if not word:
            continue
        # lookarounds instead of \b: a label word may itself contain '_' or '-' or end in punctuation
        pattern = re.compile(r"(?<![\w])" + re.escape(word) + r"(?![\w])", re.IGNORECASE)
        spans.extend(m.span() for m in pattern.finditer(text))
    return spans


def word_spans(text: str, label_words: Sequence[str] = ()) -> list[tuple[int, int, bool]]:
    """(start, end, protected) for every word of `text`; protected words overlap a label-word occurrence."""
    guard = protected_spans(text, label_words)
    out = []
    for m in WORD_RE.finditer(text):
        s, e = m.span()
        out.append((s, e, any(s < ge and gs < e for gs, ge in guard)))
    return out


def contains_label_words(text: str, label_words: Sequence[str]) -> list[str]:
    """The label words that occur in `text` as whole words (case-insensitive)."""
    return [w for w in label_words if w.strip() and protected_spans(text, [w])]


def replace_spans(text: str, edits: dict[tuple[int, int], str]) -> str:
    """Replace non-overlapping (start, end) spans; applied right to left so earlier offsets stay valid."""
    for (s, e), new in sorted(edits.items(), reverse=True):
        text = text[:s] + new + text[e:]
    return text


def budget(n_words: int, rate: float) -> int:
    """How many words a perturbation may touch: a fraction of all words, at least one."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    return max(1, round(rate * n_words))


def distinct(make_one: Callable[[], str | None], original: str, k: int, tries_per_output: int = 20) -> list[str]:
    """Call `make_one` until k distinct outputs different from `original` exist or the tries run out.

    Tries are bounded because some instructions cannot yield k distinct outputs (e.g. three words, one of them a
    label word); the caller gets fewer rather than a hang.
    """
    out: list[str] = []
    for _ in range(max(1, k) * tries_per_output):
        if len(out) >= k:
            break
        cand = make_one()
        if cand is not None and cand != original and cand not in out:
            out.append(cand)
    return out
