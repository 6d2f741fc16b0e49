"""Goal 4: ZeRO-3 per-rank memory of parameters + optimizer state, at 2 ranks / at 1 rank.

    python -m benchmarks.zero3_memory [--quick] [--dtype float32]

Launches `deepspeed --num_gpus N --module benchmarks.zero3_memory --worker` for N = 1 and 2 (CPU ranks here, GPUs
when present). Each rank builds what train.py builds (SmolLM2-135M-Instruct loaded straight into ZeRO-3 partitions,
`CoinForward`, torch AdamW, ds_configs/zero3.json resolved by the trainer), takes one real COIN step so that every
optimizer state exists, and sums the bytes of the tensors it holds, each storage counted once:

  parameters  each parameter's partition (`p.ds_tensor`, inside the flat partition buffers) plus the full copy of
              the parameters ZeRO-3 keeps whole on every rank (below stage3_param_persistence_threshold: the norms)
  optimizer   the fp32 master partitions and AdamW's exp_avg / exp_avg_sq
  gradients   the partitioned gradient buffer (reported, not in the ratio)

The ratio is the largest rank's parameters + optimizer bytes at 2 ranks over the same at 1 rank (ideal 0.5). The
process peak RSS (ru_maxrss) is reported for information: it also counts the loading path, the interpreter,
activations and allocator caching, which ZeRO-3 does not partition.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the storages behind `tensors`, skipping storages already counted (views share one)."""
    total = 0
    for t in tensors:
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def measure(engine) -> dict:
    opt, seen = engine.optimizer, set()
    params = list(engine.module.parameters())
    param_bytes = storage_bytes([p.ds_tensor for p in params], seen) + storage_bytes([p.data for p in params], seen)
    states = [v for s in opt.optimizer.state.values() for v in s.values()]
    optim_bytes = storage_bytes(opt.fp32_partitioned_groups_flat, seen) + storage_bytes(states, seen)
    grad_bytes = storage_bytes([getattr(opt, "grad_partitions_flat_buffer", None)], seen)
    return {"parameters": param_bytes, "optimizer": optim_bytes, "parameters+optimizer": param_bytes + optim_bytes,
            "gradients": grad_bytes, "n_params": sum(p.ds_numel for p in params),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def worker(out: Path, dtype: str) -> None:
    import deepspeed

    from benchmarks.step_cost import embedded_batch
    from coin_ds import distributed as D
    from coin_ds.config import Config, ModelConfig, resolve_deepspeed_config
    from coin_ds.data.batching import collate
    from coin_ds.loss import coin_loss
    from coin_ds.modeling import CoinForward, load_model, load_tokenizer

    D.init()
    cfg = Config(model=ModelConfig(path="smollm2", dtype=dtype))
    cfg.train.micro_batch_size = 1
    ds_config = resolve_deepspeed_config(ROOT / "ds_configs" / "zero3.json", cfg, D.world_size())
    tok = load_tokenizer(cfg.model)
    model = CoinForward(load_model(cfg.model, tok, ds_config=ds_config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    batch = collate(embedded_batch(tok, 1, seed=42 + D.rank()), tok.pad_token_id)
    hidden, logits, targets, rows = engine(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss = coin_loss(hidden, batch["attention_mask"], logits, targets, rows, batch["n_pairs"], cfg.loss, D.rank(),
                     D.world_size(), D.gather_with_grad, D.reduce_sum).loss
    engine.backward(loss)
    engine.step()
    (out / f"rank{D.rank()}.json").write_text(json.dumps(measure(engine)))
    D.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, dtype: str) -> list[dict]:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
               "benchmarks.zero3_memory", "--worker", "--out", tmp, "--dtype", dtype]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        files = sorted(Path(tmp).glob("rank*.json"))
        if proc.returncode != 0 or len(files) != ranks:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return [json.loads(f.read_text()) for f in files]


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import goal, write

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="accepted for run_all; memory needs no repetitions")
    p.add_argument("--dtype", default="float32", help="the trainer's default model.dtype")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.out, args.dtype)
        return {}

    runs = {n: launch(n, args.dtype) for n in (1, 2)}
    key = "parameters+optimizer"
    one, two = runs[1][0][key], max(r[key] for r in runs[2])
    mib = 1 / 2 ** 20
    for n, ranks in runs.items():
        for i, r in enumerate(ranks):
            print(f"  {n} rank(s), rank {i}: parameters {r['parameters'] * mib:.1f} MiB, optimizer "
                  f"{r['optimizer'] * mib:.1f} MiB, gradients {r['gradients'] * mib:.1f} MiB, "
                  f"peak RSS {r['peak_rss'] * mib:.0f} MiB", flush=True)
    rss = max(r["peak_rss"] for r in runs[2]) / runs[1][0]["peak_rss"]
    goals = [goal(4, "ZeRO-3 per-rank params + optimizer state, 2 ranks / 1 rank", {"value": two / one}, "<=", 0.55,
                  f"SmolLM2-135M {args.dtype}, AdamW; {one * mib:.0f} -> {two * mib:.0f} MiB; "
                  f"peak RSS ratio {rss:.2f} (info)")]
    g = goals[0]
    print(f"  goal 4: {g['name']}: {g['value']:.3f} ({g['goal']}) {'met' if g['met'] else 'MISSED'}", flush=True)
    result = {"dtype": args.dtype, "runs": {str(k): v for k, v in runs.items()}, "peak_rss_ratio": rss, "goals": goals}
    write("zero3_memory", result)
    return result


if __name__ == "__main__":
    main()
