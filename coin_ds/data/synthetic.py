"""Embedded instruction tasks: the default training data and evaluation tasks, deterministic by seed.

Each task has fixed label words and several instruction templates that all mention those label words, so that a
template can be swapped for another (a COIN positive) and the answer stays the same. They are small on purpose: a tiny
random model can learn them on a CPU in minutes, and a real instruct model (SmolLM2) can answer them zero-shot.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coin_ds.data.records import Record


@dataclass(frozen=True)
class Task:
    name: str
    templates: tuple[str, ...]
    label_words: tuple[str, ...]
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input text, label word)


_POS = ("good", "great", "wonderful", "delightful", "excellent", "charming", "brilliant", "lovely", "superb", "pleasant",
        "moving", "fun")
_NEG = ("bad", "awful", "terrible", "boring", "dreadful", "dull", "horrible", "poor", "clumsy", "tedious", "bland",
        "weak")
_NOUNS = ("film", "movie", "plot", "acting", "story", "soundtrack", "ending", "script", "cast", "dialogue", "pacing",
          "direction")
_ADVS = ("really", "truly", "quite", "rather", "very", "remarkably", "surprisingly", "simply")


def _clause(rng: random.Random) -> tuple[str, bool]:
    positive = rng.random() < 0.5
    adj = rng.choice(_POS if positive else _NEG)
    noun = rng.choice(_NOUNS)
    form = rng.randrange(3)
    if form == 0:
        return f"the {noun} was {rng.choice(_ADVS)} {adj}", positive
    if form == 1:
        return f"a {rng.choice(_ADVS)} {adj} {noun}", positive
    # negation flips the polarity: the model has to read more than one word
    return f"the {noun} was not {adj}", not positive


def _sentiment(rng: random.Random) -> tuple[str, str]:
    first, pos1 = _clause(rng)
    if rng.random() < 0.5:
        return first.capitalize() + ".", "positive" if pos1 else "negative"
    second, pos2 = _clause(rng)
    # "X, but Y": the contrast clause decides, as in SST-2 style reviews
    return f"{first.capitalize()}, but {second}.", "positive" if pos2 else "negative"


def _compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1000), 2)
    return f"{a} and {b}", "first" if a > b else "second"


_CATEGORIES = {
    "animal": ("dog", "cat", "horse", "tiger", "rabbit", "eagle", "whale", "lion", "mouse", "sheep", "wolf", "bear",
               "frog", "owl", "camel", "goat"),
    "fruit": ("apple", "banana", "mango", "cherry", "grape", "lemon", "peach", "pear", "plum", "orange", "melon", "kiwi",
              "papaya", "lime", "apricot", "fig"),
    "color": ("red", "blue", "green", "yellow", "purple", "black", "white", "pink", "brown", "gray", "violet", "cyan",
              "magenta", "beige", "crimson", "teal"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "airplane", "boat", "motorcycle", "tram", "van", "taxi",
                "scooter", "ship", "helicopter", "tractor", "subway"),
}


def _category(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_CATEGORIES))
    return rng.choice(_CATEGORIES[label]), label


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(10000)
    return str(n), "even" if n % 2 == 0 else "odd"


TASKS: dict[str, Task] = {
    "sentiment": Task(
        "sentiment",
        (
            "Classify the sentiment of the following review as 'positive' or 'negative'.",
            "Read the review below and answer with 'positive' or 'negative' to describe its sentiment.",
            "Is the opinion expressed in this text 'positive' or 'negative'?",
            "Decide whether the sentiment of the sentence is 'positive' or 'negative'.",
            "As a sentiment classifier, label the following text as 'positive' or 'negative'.",
            "Tell me if the tone of this movie review is 'positive' or 'negative'.",
        ),
        ("positive", "negative"),
        _sentiment,
    ),
    "compare": Task(
        "compare",
        (
            "Which of the two numbers is larger? Answer 'first' or 'second'.",
            "Compare the two numbers and reply with 'first' if the first is bigger, otherwise 'second'.",
            "Of the following pair of numbers, say which one is greater: 'first' or 'second'.",
            "Determine whether the first or the second number is the larger one. Respond with 'first' or 'second'.",
            "Look at both numbers and answer 'first' or 'second' to indicate the maximum.",
            "As a number comparison tool, output 'first' or 'second' for whichever number is higher.",
        ),
        ("first", "second"),
        _compare,
    ),
    "category": Task(
        "category",
        (
            "Assign the word to one category: 'animal', 'fruit', 'color' or 'vehicle'.",
            "Which category does this word belong to? Choose from 'animal', 'fruit', 'color', 'vehicle'.",
            "Classify the given word as 'animal', 'fruit', 'color' or 'vehicle'.",
            "Name the category of the following word: 'animal', 'fruit', 'color' or 'vehicle'.",
            "As a word classifier, label this word with 'animal', 'fruit', 'color' or 'vehicle'.",
            "Tell me whether the word is an 'animal', a 'fruit', a 'color' or a 'vehicle'.",
        ),
        ("animal", "fruit", "color", "vehicle"),
        _category,
    ),
    "parity": Task(
        "parity",
        (
            "Is the following number 'even' or 'odd'?",
            "Decide whether the given number is 'even' or 'odd'.",
            "Answer 'even' if the number is divisible by two, otherwise answer 'odd'.",
            "Classify the parity of this number as 'even' or 'odd'.",
            "As a parity checker, respond with 'even' or 'odd' for the number below.",
            "Tell me if this integer is 'even' or 'odd'.",
        ),
        ("even", "odd"),
        _parity,
    ),
}

# Our tasks that correspond to tasks of the paper's evaluation (PromptBench/GLUE names), with the same label words.
GLUE_ALIASES: dict[str, str] = {"sst2": "sentiment"}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; embedded tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_rng(seed: int, task: str, split: str) -> random.Random:
    # string seeds are hashed deterministically by random.Random (not by Python's per-process hash)
    return random.Random(f"coin_ds/{split}/{task}/{seed}")


def generate_records(n_per_task: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[Record]:
    """Training records: each gets a random template as its instruction and the task's other templates as paraphrases."""
    records = []
    for name in tasks or sorted(TASKS):
        task = get_task(name)
        rng = task_rng(seed, name, "train")
        for _ in range(n_per_task):
            text, label = task.make(rng)
            k = rng.randrange(len(task.templates))
            others = [t for i, t in enumerate(task.templates) if i != k]
            records.append(Record(name, task.templates[k], text, label, others))
    return records


def generate_eval_records(n_per_task: int, seed: int = 0, tasks: Sequence[str] | None = None,
                          exclude_inputs: set[tuple[str, str]] | None = None) -> list[dict]:
    """Evaluation records `{task, input, label}`, drawn from a separate stream; (task, input) pairs in
    `exclude_inputs` (e.g. the training set's) are avoided where the task's input space allows it."""
    out = []
    exclude = exclude_inputs or set()
    for name in tasks or sorted(TASKS):
        task = get_task(name)
        rng = task_rng(seed, name, "eval")
        seen: set[str] = set()
        tries = 0
        while sum(1 for r in out if r["task"] == name) < n_per_task:
            text, label = task.make(rng)
            tries += 1
            small_space = tries > 50 * n_per_task  # e.g. the category task has only 64 words
            if not small_space and ((name, text) in exclude or text in seen):
                continue
            seen.add(text)
            out.append({"task": name, "input": text, "label": label})
    return out
