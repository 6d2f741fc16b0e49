"""COIN training under DeepSpeed: the entry point and the loop.

    deepspeed --num_gpus 2 coin_ds/train.py --deepspeed ds_configs/zero3.json [--config run.yaml] [--resume] [k=v ...]

Read top to bottom: config -> data (records, triples, tokenized) -> model -> DeepSpeed engine -> loop (one forward
over all views, COIN loss, backward, step, log, checkpoint) -> final save and summary.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # run as a script, this folder would shadow libraries with our module names (config, loss, ...)
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

# models and data are local paths only: the hub is never contacted at run time (set before any HF import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import json
import math
import random
import shutil
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coin_ds import distributed as D
from coin_ds.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, model_identity, save_checkpoint
from coin_ds.config import Config, ConfigError, load_config, resolve_deepspeed_config
from coin_ds.data.batching import TripleSampler, ViewEncoder, collate, encode_triples, padding_efficiency
from coin_ds.data.records import load_records
from coin_ds.data.synthetic import TASKS, generate_records
from coin_ds.data.triples import build_triples, split_heldout
from coin_ds.loss import alignment, coin_loss, pool
from coin_ds.modeling import CoinForward, load_model, load_tokenizer

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run me again with --resume
EXIT_NONFINITE = 3


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (sections: model, lora, data, loss, train)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (default: ZeRO-3 with the trainer's values)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def log0(*args) -> None:
    if D.is_main():
        print(*args, flush=True)


# --- data -----------------------------------------------------------------------------------------------------------

def load_training_records(cfg: Config):
    """Records plus the official CSV's explicit hard-negative pairing when the file is one."""
    if cfg.data.train_file is None:
        return generate_records(cfg.data.synthetic_per_task, cfg.train.seed, cfg.data.tasks), None
    fmt = cfg.data.format
    if fmt == "coin_csv" or (fmt == "auto" and cfg.data.train_file.endswith(".csv") and _is_coin_csv(cfg.data.train_file)):
        from coin_ds.data.coin_csv import import_coin_csv

        return import_coin_csv(cfg.data.train_file)
    # records that use an embedded task's name must answer with its label words
    label_words = {name: task.label_words for name, task in TASKS.items()}
    return load_records(cfg.data.train_file, label_words=label_words), None


def _is_coin_csv(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return "original_instruction" in fh.readline()


@dataclass
class Data:
    train: list
    heldout: list
    report: dict = field(default_factory=dict)


def prepare_data(cfg: Config, tokenizer) -> Data:
    records, explicit = load_training_records(cfg)
    triples, triple_report = build_triples(records, cfg.train.seed, explicit)
    for line in triple_report.lines():
        log0(f"[data] {line}")
    train_t, held_t = split_heldout(triples, cfg.data.eval_triples, cfg.train.seed)
    encoder = ViewEncoder(tokenizer, cfg.data.template, cfg.data.max_length, cfg.data.add_eos)
    train, too_long = encode_triples(train_t, encoder, progress=D.is_main())
    heldout, too_long_held = encode_triples(held_t, encoder)
    report = {"records": len(records), "triples": len(triples), "skipped": dict(triple_report.skipped),
              "too_long": too_long + too_long_held, "inputs_truncated": encoder.truncated,
              "train_triples": len(train), "heldout_triples": len(heldout)}
    if too_long + too_long_held:
        log0(f"[data] skipped {too_long + too_long_held} triple(s): instruction + output exceed data.max_length")
    if encoder.truncated:
        log0(f"[data] truncated the input of {encoder.truncated} view(s) to fit data.max_length={cfg.data.max_length}")
    return Data(train, heldout, report)


# --- model and engine -----------------------------------------------------------------------------------------------

def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_engine(cfg: Config, ds_config: dict, tokenizer, total_steps: int):
    import deepspeed

    lm = load_model(cfg.model, tokenizer, cfg.train.seed, ds_config, qlora=cfg.lora.enabled and cfg.lora.qlora)
    if cfg.lora.enabled:
        from coin_ds.adapters import apply_lora

        lm = apply_lora(lm, cfg.lora, cfg.model)
    model = CoinForward(lm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  betas=tuple(cfg.train.betas))
    warmup = int(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.schedule, warmup, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    return engine, scheduler


def forward_loss(engine, batch: dict, cfg: Config):
    hidden, logits, targets, rows = engine(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return coin_loss(hidden, batch["attention_mask"], logits, targets, rows, batch["n_pairs"], cfg.loss,
                     rank=D.rank(), world_size=D.world_size(), gather=D.gather_with_grad, reduce_sum=D.reduce_sum)


@torch.no_grad()
def measure_alignment(engine, heldout: list, cfg: Config, pad_id: int, batch_size: int = 16) -> dict:
    """mean cos(orig, para) − mean cos(orig, neg) of pooled last-token states on held-out triples, over all ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    was_training = engine.module.training
    engine.eval()
    per_rank = len(heldout) // D.world_size()
    mine = heldout[D.rank() * per_rank:(D.rank() + 1) * per_rank]
    sums = torch.zeros(3)
    for s in range(0, per_rank, batch_size):
        batch = collate(mine[s:s + batch_size], pad_id, cfg.data.padding_side)
        hidden, *_ = engine(batch["input_ids"], batch["attention_mask"])
        h = pool(hidden, batch["attention_mask"], cfg.loss.pooling)
        n = batch["n_pairs"]
        a = alignment(h[:n], h[n:2 * n], h[2 * n:])
        sums += torch.tensor([a["cos_para"] * n, a["cos_neg"] * n, n])
    sums = D.reduce_sum(sums)
    if was_training:
        engine.train()
    if sums[2] == 0:
        return {}
    cos_para, cos_neg = float(sums[0] / sums[2]), float(sums[1] / sums[2])
    return {"cos_para": cos_para, "cos_neg": cos_neg, "alignment": cos_para - cos_neg, "triples": int(sums[2])}


# --- final save ----------------------------------------------------------------------------------------------------

def save_final(engine, cfg: Config, tokenizer, out: Path) -> dict:
    """Consolidated weights as a transformers directory (ZeRO-3 gathers: every rank must call this)."""
    from coin_ds.modeling import unwrap

    written = {}
    if cfg.lora.enabled and cfg.train.export_adapter:
        from coin_ds.adapters import save_adapter

        written["adapter"] = str(save_adapter(engine, out / "adapter", tokenizer))
    if cfg.train.save_final_model and not cfg.lora.enabled:
        if engine.zero_optimization_partition_weights():
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict()
        if D.is_main():
            state = {k.removeprefix("lm."): v for k, v in state.items()}
            final = out / "final_model"
            tmp = out / "final_model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrap(engine.module.lm).save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            written["final_model"] = str(final)
        D.barrier()
    return written


# --- the loop -------------------------------------------------------------------------------------------------------

class Preemption:
    """SIGUSR1/SIGTERM (SLURM's warning, a scheduler's kill) ask for a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    # first of all: a scheduler's warning during the slow start-up must not kill the ranks
    preemption = Preemption()
    args, rest = parse_args(argv)
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    D.init(cfg.train.dist_timeout_s)
    try:
        ds_config = resolve_deepspeed_config(args.deepspeed, cfg, D.world_size())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    random.seed(cfg.train.seed + D.rank())
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    ckpt_dir = out / "checkpoints"
    _register_rank(out)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "deepspeed": ds_config}, indent=2))
    t_start = time.time()

    tokenizer = load_tokenizer(cfg.model, cfg.train.seed)
    data = prepare_data(cfg, tokenizer)
    sampler = TripleSampler([t.length for t in data.train], cfg.train.micro_batch_size, D.rank(), D.world_size(),
                            cfg.train.seed, cfg.data.group_by_length)
    steps_per_epoch = sampler.batches_per_epoch // cfg.train.grad_accum
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    if total_steps <= 0:
        raise SystemExit(f"no optimizer step fits: {len(data.train)} triples, {sampler.global_batch} per micro-step, "
                         f"{cfg.train.grad_accum} micro-steps per step")
    data.report["dropped_per_epoch"] = sampler.dropped_per_epoch
    log0(f"[data] {len(data.train)} training triples, {sampler.global_batch} per micro-step over "
         f"{D.world_size()} rank(s); {sampler.dropped_per_epoch} left out of each epoch (incomplete global batch)")

    engine, scheduler = build_engine(cfg, ds_config, tokenizer, total_steps)
    identity = model_identity(engine, cfg)
    step, nonfinite_skipped = 0, []
    if args.resume and latest_checkpoint(ckpt_dir) is not None:
        step, client = load_checkpoint(engine, ckpt_dir, identity)
        sampler.load_state_dict(client["sampler"])
        nonfinite_skipped = list(client.get("nonfinite_skipped", []))
        if D.is_main():
            _truncate_metrics(out / "metrics.jsonl", step)
        log0(f"[resume] from {ckpt_dir} at step {step} (epoch {sampler.epoch}, batch {sampler.position})")
    elif args.resume:
        log0(f"[resume] no checkpoint in {ckpt_dir}: starting fresh")

    def checkpoint(at_step: int, sampler_state: dict) -> Path:
        client = {"sampler": sampler_state, "nonfinite_skipped": nonfinite_skipped}
        return save_checkpoint(engine, ckpt_dir, at_step, client, identity, cfg.train.keep_checkpoints)

    pad_id = tokenizer.pad_token_id
    align_before = measure_alignment(engine, data.heldout, cfg, pad_id)
    log0(f"[eval] alignment before: {align_before}")

    metrics_file = open(out / "metrics.jsonl", "a") if D.is_main() else None
    tb = _tensorboard(out, cfg) if D.is_main() else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not D.is_main())
    history, exit_code = [], 0
    while step < total_steps:
        t0, tokens, acc, eff = time.time(), 0, [], []
        start_state = sampler.state_dict()
        nonfinite = False
        skipped_micro = 0
        for _ in range(cfg.train.grad_accum):
            _debug_crash(step + 1)
            batch = collate([data.train[i] for i in sampler.next_batch()], pad_id, cfg.data.padding_side)
            result = forward_loss(engine, batch, cfg)
            _debug_nan(result, step + 1)
            if _nonfinite_anywhere(result):
                nonfinite = True
                if cfg.train.on_nan == "stop":
                    break  # no backward, no optimizer step: the weights stay those of the last good step
                skipped_micro += 1
                if skipped_micro == cfg.train.grad_accum:
                    # nothing finite to apply in this step: lr 0 leaves every weight exactly as it is (the
                    # scheduler's next step restores the lr); Adam's moments still decay by one step
                    for group in engine.optimizer.param_groups:
                        group["lr"] = 0.0
                # a graph-free zero keeps DeepSpeed's micro-step bookkeeping in step on every rank while adding
                # no gradient (backward through the non-finite graph would put NaN in the gradient)
                engine.backward(torch.zeros((), requires_grad=True) * 1.0)  # DeepSpeed wants a grad_fn
            else:
                engine.backward(result.loss)
            engine.step()
            tokens += int(batch["attention_mask"].sum())
            acc.append(result)
            eff.append(padding_efficiency(batch))
        if nonfinite and cfg.train.on_nan == "stop":
            print(f"[nan] rank {D.rank()}: non-finite loss at step {step + 1} (this rank's loss "
                  f"{float(result.loss)}, global l_gen {result.l_gen}, l_ctr {result.l_ctr}); saving the last good "
                  f"state (step {step}) and stopping (train.on_nan=stop)", file=sys.stderr, flush=True)
            path = checkpoint(step, start_state)
            log0(f"[checkpoint] {path} (last good state)")
            if D.is_main():
                (out / "nonfinite.json").write_text(json.dumps({"step": step + 1, "checkpoint": str(path),
                                                                "l_gen": result.l_gen, "l_ctr": result.l_ctr}))
            exit_code = EXIT_NONFINITE
            break
        step += 1
        if nonfinite:
            nonfinite_skipped.append(step)
        row = {
            "step": step, "epoch": sampler.epoch,
            "l_gen": _mean(r.l_gen for r in acc), "l_ctr": _mean(r.l_ctr for r in acc),
            "weight": _mean(r.weight for r in acc), "loss": _mean(r.l_gen + r.weight * r.l_ctr for r in acc),
            "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens * D.world_size() / (time.time() - t0),
            "padding_efficiency": _mean(eff), "skipped_nonfinite": nonfinite,
        }
        if nonfinite:
            log0(f"[nan] non-finite loss at step {step}: {skipped_micro} of {cfg.train.grad_accum} micro-batch(es) "
                 f"skipped (train.on_nan=skip)")
        history.append(row)
        if metrics_file and step % cfg.train.log_every == 0:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if tb:
                for k in ("l_gen", "l_ctr", "weight", "loss", "lr", "tokens_per_s"):
                    tb.add_scalar(f"train/{k}", row[k], step)
        bar.update(1)
        bar.set_postfix(l_gen=f"{row['l_gen']:.3f}", l_ctr=f"{row['l_ctr']:.3f}", w=f"{row['weight']:.2f}")
        preempted = bool(D.reduce_sum(torch.tensor(float(preemption.requested))) > 0)
        if preempted or (cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps):
            path = checkpoint(step, sampler.state_dict())
            log0(f"[checkpoint] {path}")
        if preempted:
            log0(f"[preempted] checkpoint saved at step {step}; exiting with {EXIT_PREEMPTED} so the job can requeue")
            if D.is_main():
                (out / "preempted.json").write_text(json.dumps({"step": step}))
            exit_code = EXIT_PREEMPTED
            break
    bar.close()
    if metrics_file:
        metrics_file.close()
    if exit_code:
        return exit_code

    final_ckpt = checkpoint(step, sampler.state_dict())
    data.report["nonfinite_steps_skipped"] = nonfinite_skipped
    written = save_final(engine, cfg, tokenizer, out)
    align_after = measure_alignment(engine, data.heldout, cfg, pad_id)
    summary = {
        "output_dir": str(out), "checkpoint": str(final_ckpt), "steps": step, "world_size": D.world_size(),
        "wall_time_s": round(time.time() - t_start, 1), "data": data.report,
        "start": _window(history[:10]), "end": _window(history[-10:]),
        "alignment_before": align_before, "alignment_after": align_after, **written,
    }
    if D.is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "preempted.json").unlink(missing_ok=True)
        print(format_summary(summary), flush=True)
    if tb:
        tb.close()
    return 0


def _nonfinite_anywhere(result) -> bool:
    """True on every rank when the loss is non-finite on any rank, so that all ranks take the same branch."""
    bad = not (math.isfinite(result.l_gen) and math.isfinite(result.l_ctr) and bool(torch.isfinite(result.loss)))
    return bool(D.reduce_sum(torch.tensor(float(bad))) > 0)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget the rows logged after the checkpoint: they are logged again, once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in rows))
    os.replace(tmp, path)


# --- test-only fault injection (environment variables; never set in real runs) --------------------------------------

def _debug_crash(step: int) -> None:
    """COIN_DS_DEBUG_CRASH_RANK=r COIN_DS_DEBUG_CRASH_STEP=k: rank r dies hard (no cleanup) at the start of step k."""
    if (os.environ.get("COIN_DS_DEBUG_CRASH_RANK") == str(D.rank())
            and os.environ.get("COIN_DS_DEBUG_CRASH_STEP") == str(step)):
        print(f"[debug] rank {D.rank()}: simulated hard crash at step {step} (t={time.time():.3f})", file=sys.stderr,
              flush=True)
        os._exit(1)


def _debug_nan(result, step: int) -> None:
    """COIN_DS_DEBUG_NAN_STEP=k [COIN_DS_DEBUG_NAN_RANK=r]: the loss of step k on rank r (default: the last) is NaN."""
    if os.environ.get("COIN_DS_DEBUG_NAN_STEP") != str(step):
        return
    if int(os.environ.get("COIN_DS_DEBUG_NAN_RANK", D.world_size() - 1)) == D.rank():
        result.loss = result.loss * float("nan")


def _window(rows: list[dict]) -> dict | None:
    """Mean of the logged losses over a few steps: one step of a small batch is too noisy to compare."""
    if not rows:
        return None
    return {k: _mean(r[k] for r in rows) for k in ("l_gen", "l_ctr", "weight", "loss")} | {"steps": len(rows)}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def _tensorboard(out: Path, cfg: Config):
    if not cfg.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def format_summary(s: dict) -> str:
    def fmt(row, key):
        return f"{row[key]:.4f}" if row else "-"

    lines = [
        "", "=" * 72, "COIN training summary", "=" * 72,
        f"output dir     {s['output_dir']}  (metrics.jsonl, tensorboard/, summary.json)",
        f"checkpoint     {s['checkpoint']}",
    ]
    for key in ("final_model", "adapter"):
        if key in s:
            lines.append(f"{key:<14} {s[key]}")
    lines += [
        f"steps          {s['steps']} on {s['world_size']} rank(s) in {s['wall_time_s']} s",
        f"data           {s['data']['train_triples']} train / {s['data']['heldout_triples']} held-out triples; "
        f"skipped {sum(s['data']['skipped'].values())} record(s), {s['data']['too_long']} too long, "
        f"{s['data']['dropped_per_epoch']} left out per epoch, {s['data'].get('inputs_truncated', 0)} input(s) "
        f"truncated",
        *[f"               {n} x {reason}" for reason, n in s["data"]["skipped"].items()],
        *([f"non-finite     skipped step(s) {s['data']['nonfinite_steps_skipped']}"]
          if s["data"].get("nonfinite_steps_skipped") else []),
        "",
        f"{'(mean of 10 steps)':<22}{'start':>10}{'end':>10}",
        f"{'L_gen':<22}{fmt(s['start'], 'l_gen'):>10}{fmt(s['end'], 'l_gen'):>10}",
        f"{'L_ctr':<22}{fmt(s['start'], 'l_ctr'):>10}{fmt(s['end'], 'l_ctr'):>10}",
        f"{'weight w':<22}{fmt(s['start'], 'weight'):>10}{fmt(s['end'], 'weight'):>10}",
    ]
    b, a = s["alignment_before"], s["alignment_after"]
    if b and a:
        lines += [
            "",
            "held-out alignment     before     after   (last-token states, cosine)",
            f"{'cos(orig, para)':<22}{b['cos_para']:>7.4f}{a['cos_para']:>10.4f}",
            f"{'cos(orig, neg)':<22}{b['cos_neg']:>7.4f}{a['cos_neg']:>10.4f}",
            f"{'para - neg':<22}{b['alignment']:>7.4f}{a['alignment']:>10.4f}",
        ]
    lines.append("=" * 72)
    return "\n".join(lines)


# --- failures: say which rank ---------------------------------------------------------------------------------------

_RANK_DIR: Path | None = None


def _register_rank(out: Path) -> None:
    """Each rank notes its host and pid, so that a survivor can tell which peer on its host has died."""
    global _RANK_DIR
    _RANK_DIR = out / ".ranks"
    _RANK_DIR.mkdir(parents=True, exist_ok=True)
    (_RANK_DIR / f"rank{D.rank()}.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def dead_peers() -> list[int]:
    """Ranks on this host whose process has exited (ranks on other hosts cannot be checked from here)."""
    if _RANK_DIR is None:
        return []
    gone = []
    for f in sorted(_RANK_DIR.glob("rank*.json")):
        info = json.loads(f.read_text())
        if info["host"] == socket.gethostname() and info["pid"] != os.getpid() and _process_gone(info["pid"]):
            gone.append(int(f.stem.removeprefix("rank")))
    return gone


def _process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie: dead, not yet reaped by the launcher


def run(argv: list[str] | None = None) -> int:
    """main() with a failure report that names this rank and any peer rank found dead (a bare traceback from N
    interleaved ranks does not say whose it is, and a rank killed by the OS leaves no traceback at all)."""
    from coin_ds.data.records import RecordError
    from coin_ds.modeling import ModelLoadError

    try:
        return main(argv)
    except (CheckpointError, RecordError, ModelLoadError) as e:  # bad input: the message says it all
        print(f"[rank {D.rank()}] error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        gone = dead_peers()
        if not gone and D.world_size() > 1:
            time.sleep(1.0)  # the peer's socket can close a moment before its process is marked dead
            gone = dead_peers()
        peers = f"; rank(s) {', '.join(map(str, gone))} on this host exited first" if gone else ""
        traceback.print_exc()
        print(f"[rank {D.rank()}/{D.world_size()}] failed: {type(e).__name__}: {str(e)[:300]}{peers}",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(run())
