"""Our perturbations against the paper's own evaluation sets (real data: ../shared/data/coin_prompts/prompts.json).

Character level: per task, the edit distances of our `deepwordbug` perturbations of the paper's clean instructions fall
in the range of the paper's deepwordbug set. Sentence level: our `checklist` perturbations (PromptBench placement) have
exactly the paper's checklist shape. Run with `-s` to see the numbers.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import pytest
from conftest import levenshtein

from coin_ds.perturb import perturb_instruction

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(os.environ.get("COIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PROMPTS = SHARED / "coin_prompts" / "prompts.json"
GLUE_LABELS = {
    "sst2": ["positive", "negative"], "cola": ["acceptable", "unacceptable"],
    "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"], "wnli": ["entailment", "not_entailment"],
    "mrpc": ["equivalent", "not_equivalent"], "qqp": ["equivalent", "not_equivalent"],
}
SEEDS = range(5)


@pytest.fixture(scope="module")
def prompts() -> dict:
    if not PROMPTS.is_file():
        pytest.skip(f"real data absent: {PROMPTS} not found (set COIN_SHARED_DATA to the shared data folder)")
    return json.loads(PROMPTS.read_text(encoding="utf-8"))


def paper_pairs(prompts: dict, level: str, task: str) -> list[tuple[str, str]]:
    """(clean, perturbed) pairs of the paper that really correspond: a few rows of its sets were made from another
    version of the clean instruction (distance 23-67, different word count), and those are left out."""
    return [(c, p) for c, p in zip(prompts["clean"][task], prompts[level][task]) if len(c.split()) == len(p.split())]


def character_comparison(prompts: dict) -> dict[str, dict]:
    out = {}
    for task, labels in GLUE_LABELS.items():
        paper = [levenshtein(c, p) for c, p in paper_pairs(prompts, "deepwordbug", task)]
        ours = [levenshtein(c, o) for c in prompts["clean"][task] for s in SEEDS
                for o in perturb_instruction(c, "deepwordbug", label_words=labels, seed=s)]
        out[task] = {"paper": sorted(paper), "ours_min": min(ours), "ours_median": statistics.median(ours),
                     "ours_max": max(ours), "ours": ours}
    return out


def test_character_level_edit_distance_matches_paper_deepwordbug(prompts):
    table = character_comparison(prompts)
    print("\ntask   paper deepwordbug distances     ours (5 seeds x 6 instructions): min / median / max")
    for task, row in table.items():
        print(f"{task:<6} {str(row['paper']):<30} {row['ours_min']:>3} / {row['ours_median']:>4} / {row['ours_max']:>3}")
    for task, row in table.items():
        lo, hi = min(row["paper"]), max(row["paper"])
        assert lo <= row["ours_median"] <= hi, (task, row["paper"], row["ours_median"])
        # the paper's six instructions are a small sample, so allow a margin of 3 edits for single outputs
        inside = sum(lo - 3 <= d <= hi + 3 for d in row["ours"]) / len(row["ours"])
        assert inside >= 0.9, (task, row["paper"], sorted(row["ours"]))


def test_character_level_never_touches_label_words_of_paper_instructions(prompts):
    for task, labels in GLUE_LABELS.items():
        for clean in prompts["clean"][task]:
            for out in perturb_instruction(clean, "char", label_words=labels, k=3, seed=1):
                for w in labels:
                    pat = re.compile(r"(?<!\w)" + re.escape(w) + r"(?!\w)", re.IGNORECASE)
                    assert len(pat.findall(out)) >= len(pat.findall(clean)), (clean, out, w)


CHECKLIST_SHAPE = re.compile(r"^(?P<body>.*\S) (?P<token>[A-Za-z0-9]{10})(?P<mark>[:.]?) $", re.DOTALL)


def test_sentence_level_has_the_shape_of_paper_checklist(prompts):
    exact = total = 0
    for task in GLUE_LABELS:
        for clean, theirs in zip(prompts["clean"][task], prompts["checklist"][task]):
            assert CHECKLIST_SHAPE.match(theirs), theirs  # the paper's own set has the shape we test for
            ours = perturb_instruction(clean, "checklist", placement="promptbench", seed=3)[0]
            m = CHECKLIST_SHAPE.match(ours)
            assert m, ours
            assert clean.rstrip().startswith(m["body"]) and m["body"] + m["mark"] == clean.rstrip()
            # with their random token in place of ours, ours is character-for-character the paper's string
            total += 1
            exact += ours.replace(m["token"], CHECKLIST_SHAPE.match(theirs)["token"]) == theirs
    print(f"\nchecklist: {exact}/{total} of our perturbations equal the paper's once the random token is swapped")
    # the rest are rows whose clean instruction differs from the one the paper's checklist row was made from
    assert exact >= 0.9 * total


def test_sentence_level_default_keeps_original_as_prefix_on_paper_instructions(prompts):
    for task in GLUE_LABELS:
        for clean in prompts["clean"][task]:
            for out in perturb_instruction(clean, "sentence", k=3, seed=2):
                assert out.startswith(clean) and len(out) > len(clean)
