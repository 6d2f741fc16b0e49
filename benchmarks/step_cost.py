"""Goals 1-3: what a COIN training step costs against its floor (plain SFT) and the official two-pass design, and MFU.

    python -m benchmarks.step_cost [--quick] [--dtype bfloat16|float32] [--triples 4] [--mfu-triples 2] [--seq 256]

Model: SmolLM2-135M-Instruct (49k vocabulary, tied embeddings), bf16 by default, one process, 2 threads on the CPU
(the same script runs on CUDA when present). Data: B triples (default 4) of the embedded tasks, encoded by the
trainer's `ViewEncoder` (max_length 256) and picked by its `TripleSampler`, so rows [orig | para | neg] = 3B sequences.

A step is: zero the gradients, forward, loss, backward. No variant takes an optimizer step (it costs the same for all,
so it would only dilute the ratios); AdamW over all parameters is timed on its own and enters only the MFU line
"with optimizer". Variants, all run in rotation in the same rounds:

  coin      what train.py runs: `CoinForward` (one pass over the 3B right-padded rows, logits only at labelled
            positions) + `coin_loss` (defaults: hard negatives, symmetric InfoNCE, tau 0.05, lambda 1000).
  sft       the floor: the same forward on the same 3B rows, plain token cross-entropy on the same labelled positions
            (outputs of orig and para; the negatives carry no labels in either, so both run the same sequences and
            the same logits and the difference is COIN's machinery: pooling, InfoNCE, weight, its backward).
  sft_hf    for information: the same rows through `model(..., labels=)`, HF's standard causal-LM loss with
            full-vocabulary logits at every position.
  official  the official CoIN pattern on the same 3B rows: two HF passes, `model(..., labels=, output_hidden_states=True)`
            over [orig; neg] (2B rows, as the official data puts the hard negative next to its original) and over
            para (B rows), each left padded to its own width; h = hidden_states[-1][:, -1]; the same InfoNCE and
            weight; backward through both passes.
  coin@seq  goal 3: the coin step on 3 x mfu-triples rows of exactly `seq` real tokens (random ids), the last quarter
            of each orig/para row labelled.
  matmul    goal 3's denominator: 16 square matmuls of 2048 in the model's dtype (the machine's matmul FLOP/s).
  adamw     torch AdamW (foreach) step over all parameters, for the "with optimizer" MFU.

FLOPs (`step_flops`): 6 * N_linear * T for the decoder's linear layers (fwd 2, bwd 4), 12 * L * d_attn * s per token
for attention scores and values (full s x s square, PaLM convention), 6 * d * V per position for lm_head. "useful"
counts lm_head only at the labelled positions (what coin computes); "HF-equivalent" counts it at every position (what
a `labels=` forward computes, most of it wasted), reported for comparison with other trainers' MFU numbers.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import DTYPES, fmt_times, goal, interleaved, load_smollm2, pick_device, ratio, write
from coin_ds.data.batching import IGNORE, TripleSampler, ViewEncoder, collate, encode_triples
from coin_ds.data.synthetic import generate_records
from coin_ds.data.triples import build_triples
from coin_ds.loss import LossSettings, adaptive_weight, coin_loss, contrastive_per_anchor
from coin_ds.modeling import CoinForward


def step_flops(config, n_seqs: int, seq_len: int, logit_positions: int) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward) over n_seqs rows of seq_len tokens."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * ff  # q k v o, gate up down
    tokens = n_seqs * seq_len
    linear = 6.0 * layers * per_layer * tokens
    attention = 12.0 * layers * heads * head_dim * seq_len * tokens
    lm_head_one = 6.0 * d * config.vocab_size
    return {"linear": linear, "attention": attention, "lm_head_useful": lm_head_one * logit_positions,
            "lm_head_all": lm_head_one * tokens, "useful": linear + attention + lm_head_one * logit_positions,
            "hf_equivalent": linear + attention + lm_head_one * tokens, "linear_params": layers * per_layer}


def trim(batch: dict, rows: list[int]) -> dict:
    """The given rows, without the columns that are padding in all of them (each official pass pads on its own)."""
    keep = batch["attention_mask"][rows].bool().any(0)
    return {k: batch[k][rows][:, keep] for k in ("input_ids", "attention_mask", "labels")}


def embedded_batch(tok, n_triples: int, seed: int = 42) -> list:
    records = generate_records(30, seed)
    triples, _ = build_triples(records, seed)
    encoded, _ = encode_triples(triples, ViewEncoder(tok, "auto", 256))
    sampler = TripleSampler([t.length for t in encoded], n_triples, 0, 1, seed, group_by_length=True)
    return [encoded[i] for i in sampler.next_batch()]


def seq_batch(vocab: int, n_triples: int, seq: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (3 * n_triples, seq), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:2 * n_triples, -seq // 4:] = ids[:2 * n_triples, -seq // 4:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "n_pairs": n_triples}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 rounds after 1 warm-up round (default 7 after 2)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--triples", type=int, default=4, help="triples per micro-batch (3x rows) for goals 1-2")
    p.add_argument("--mfu-triples", type=int, default=2, help="triples of --seq tokens for goal 3")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--name", default="step_cost", help="results/<name>.json")
    args = p.parse_args(argv)
    reps, warmup = (args.reps or (5 if args.quick else 7)), (1 if args.quick else 2)

    device = pick_device()
    model, tok = load_smollm2(args.dtype, device)
    fwd = CoinForward(model)
    settings = LossSettings()
    n = args.triples

    right = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in collate(embedded_batch(tok, n), tok.pad_token_id, "right").items()}
    left = {k: v.to(device) if torch.is_tensor(v) else v
            for k, v in collate(embedded_batch(tok, n), tok.pad_token_id, "left").items()}
    pass_orig = trim(left, list(range(n)) + list(range(2 * n, 3 * n)))
    pass_para = trim(left, list(range(n, 2 * n)))
    long = seq_batch(model.config.vocab_size, args.mfu_triples, args.seq, device)
    dtype = DTYPES[args.dtype]
    size, n_mm = 2048, 16
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

    def coin_step(batch: dict) -> None:
        model.zero_grad(set_to_none=True)
        hidden, logits, targets, rows = fwd(batch["input_ids"], batch["attention_mask"], batch["labels"])
        coin_loss(hidden, batch["attention_mask"], logits, targets, rows, batch["n_pairs"], settings).loss.backward()

    def sft_step() -> None:
        model.zero_grad(set_to_none=True)
        _, logits, targets, _ = fwd(right["input_ids"], right["attention_mask"], right["labels"])
        F.cross_entropy(logits.float(), targets).backward()

    def sft_hf_step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=right["input_ids"], attention_mask=right["attention_mask"], labels=right["labels"]).loss.backward()

    def official_step() -> None:
        model.zero_grad(set_to_none=True)
        o = model(**pass_orig, output_hidden_states=True)
        q = model(**pass_para, output_hidden_states=True)
        h_o, h_p = o.hidden_states[-1][:, -1], q.hidden_states[-1][:, -1]
        h_orig, h_neg = h_o[:n], h_o[n:]
        ctr = contrastive_per_anchor(h_orig, h_p, h_orig, h_p, h_neg, 0, settings.temperature, True).mean()
        l_gen = o.loss + q.loss
        (l_gen + adaptive_weight(l_gen, ctr, settings.lambda_max) * ctr).backward()

    def matmul() -> None:
        for _ in range(n_mm):
            torch.mm(a, b)

    seq_name = f"coin@{args.seq}"
    variants = {"coin": lambda: coin_step(right), "sft": sft_step, "sft_hf": sft_hf_step, "official": official_step,
                seq_name: lambda: coin_step(long), "matmul": matmul, "adamw": optimizer.step}
    shape = tuple(right["input_ids"].shape)
    print(f"[step_cost] SmolLM2-135M {args.dtype} on {device}, {torch.get_num_threads()} threads; goals 1-2: "
          f"{n} triples = {shape[0]} rows x {shape[1]} (official: {tuple(pass_orig['input_ids'].shape)} + "
          f"{tuple(pass_para['input_ids'].shape)}); goal 3: {3 * args.mfu_triples} rows x {args.seq}; "
          f"{reps} rounds after {warmup} warm-up", flush=True)
    times = interleaved(variants, reps, warmup, device)
    print(fmt_times(times), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    peak = n_mm * 2.0 * size ** 3 / med["matmul"]
    labelled = int((long["labels"][:, 1:] != IGNORE).sum())
    flops = step_flops(model.config, long["input_ids"].shape[0], args.seq, labelled)
    mfu = {"useful": flops["useful"] / med[seq_name] / peak,
           "hf_equivalent": flops["hf_equivalent"] / med[seq_name] / peak,
           "useful_with_optimizer": flops["useful"] / (med[seq_name] + med["adamw"]) / peak}
    per_round_mfu = [flops["useful"] / s / (n_mm * 2.0 * size ** 3 / m) for s, m in zip(times[seq_name], times["matmul"])]
    ratios = {"coin/sft": ratio(times, "coin", "sft"), "coin/official": ratio(times, "coin", "official"),
              "coin/sft_hf": ratio(times, "coin", "sft_hf"), "sft/sft_hf": ratio(times, "sft", "sft_hf")}
    where = f"SmolLM2-135M {args.dtype}, {shape[0]} rows x {shape[1]}"
    goals = [
        goal(1, "COIN step / plain SFT step (same 3B sequences)", ratios["coin/sft"], "<=", 1.05, where),
        goal(2, "one-pass COIN step / official two-pass step", ratios["coin/official"], "<=", 0.80, where),
        goal(3, f"training MFU, COIN step at seq {args.seq} (useful FLOPs)",
             {"value": mfu["useful"], "spread": f"{min(per_round_mfu):.3f}..{max(per_round_mfu):.3f}"}, ">=", 0.5,
             f"{3 * args.mfu_triples} rows x {args.seq}; peak {peak / 1e9:.0f} GFLOP/s; "
             f"HF-equivalent {mfu['hf_equivalent']:.3f}; with AdamW {mfu['useful_with_optimizer']:.3f}"),
    ]
    for g in goals:
        print(f"  goal {g['id']}: {g['name']}: {g['value']:.3f} ({g['goal']}; rounds {g['spread']}) "
              f"{'met' if g['met'] else 'MISSED'}", flush=True)
    print(f"  info: coin/sft_hf {ratios['coin/sft_hf']['value']:.3f}, sft/sft_hf {ratios['sft/sft_hf']['value']:.3f}; "
          f"MFU HF-equivalent {mfu['hf_equivalent']:.3f}, with AdamW {mfu['useful_with_optimizer']:.3f}", flush=True)
    result = {"dtype": args.dtype, "rows": shape[0], "width": shape[1], "seq": args.seq, "reps": reps,
              "warmup": warmup, "times": times, "ratios": ratios, "flops": flops, "peak_flops": peak, "mfu": mfu,
              "goals": goals}
    write(args.name, result)
    return result


if __name__ == "__main__":
    main()
