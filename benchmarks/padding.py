"""Goal 6: padding efficiency (real tokens / padded tokens) of the micro-batches the trainer builds on the embedded data.

    python -m benchmarks.padding [--quick]

Runs train.py's own data path (`prepare_data`: embedded tasks -> triples -> `ViewEncoder`, then `TripleSampler` +
`collate`) with the demo settings (tiny BPE tokenizer, 300 records per task, micro-batch 4 triples, 2 ranks) and
counts, over one epoch on every rank, sum(attention_mask) / sum(rows x width), token-weighted. Also reported: the same
without length grouping, with SmolLM2's tokenizer, and the floor that keeping triples together allows (each triple
padded only to its own longest view: one forward serves all three views, so this much padding is inherent).
No model is run; no timing.
"""

from __future__ import annotations

import argparse

from coin_ds.config import Config, ModelConfig
from coin_ds.data.batching import TripleSampler, collate
from coin_ds.modeling import load_tokenizer
from coin_ds.train import prepare_data


def epoch_efficiency(train: list, pad_id: int, micro_batch: int, world: int, group_by_length: bool,
                     seed: int = 42) -> float:
    """Token-weighted real / padded over one epoch of every rank's micro-batches."""
    real = padded = 0
    for rank in range(world):
        sampler = TripleSampler([t.length for t in train], micro_batch, rank, world, seed, group_by_length)
        for _ in range(sampler.batches_per_epoch):
            mask = collate([train[i] for i in sampler.next_batch()], pad_id)["attention_mask"]
            real, padded = real + int(mask.sum()), padded + mask.numel()
    return real / padded


def triple_floor(train: list) -> float:
    """Efficiency if every triple were padded only to its own longest view (micro-batches of one triple)."""
    real = sum(len(v.input_ids) for t in train for v in (t.orig, t.para, t.neg))
    return real / sum(3 * t.length for t in train)


def measure(model_path: str, micro_batch: int = 4, world: int = 2) -> dict:
    cfg = Config(model=ModelConfig(path=model_path))
    tok = load_tokenizer(cfg.model, cfg.train.seed)
    train = prepare_data(cfg, tok).train
    return {"triples": len(train), "micro_batch": micro_batch, "world": world,
            "grouped": epoch_efficiency(train, tok.pad_token_id, micro_batch, world, True),
            "ungrouped": epoch_efficiency(train, tok.pad_token_id, micro_batch, world, False),
            "triple_floor": triple_floor(train)}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import goal, write

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="skip the SmolLM2-tokenizer line")
    args = p.parse_args(argv)
    results = {"tiny": measure("tiny")}
    if not args.quick:
        results["smollm2"] = measure("smollm2")
    for name, r in results.items():
        print(f"  {name} tokenizer, {r['triples']} triples, {r['micro_batch']}/rank x {r['world']} ranks: grouped "
              f"{r['grouped']:.3f}, ungrouped {r['ungrouped']:.3f}, one-triple floor {r['triple_floor']:.3f}",
              flush=True)
    demo = results["tiny"]
    goals = [goal(6, "padding efficiency of the trainer's batches (embedded data)", {"value": demo["grouped"]}, ">=",
                  0.9, f"demo: tiny tokenizer, 4 triples/rank x 2 ranks; ungrouped {demo['ungrouped']:.3f}, "
                       f"one-triple floor {demo['triple_floor']:.3f}")]
    g = goals[0]
    print(f"  goal 6: {g['name']}: {g['value']:.3f} ({g['goal']}) {'met' if g['met'] else 'MISSED'}", flush=True)
    result = {"results": results, "goals": goals}
    write("padding", result)
    return result


if __name__ == "__main__":
    main()
