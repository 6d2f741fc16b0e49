"""Checkpoints: atomic save, resume with a model-identity check, per-rank RNG state.

Layout of `<output_dir>/checkpoints/`:

    step_0000040/          one complete checkpoint: DeepSpeed's files (model, ZeRO partitions, optimizer, scheduler,
                           client state with the step and the sampler position), rng_rank{r}.pt, meta.json
    step_0000048.tmp/      a save in progress (or one that was interrupted): never loaded, removed by the next save
    latest                 the name of the newest complete checkpoint, written last

A save goes to `<tag>.tmp`; only when every rank has written everything does rank 0 rename it to `<tag>` and then
replace `latest` (itself written to a temporary file and renamed). An interrupted save therefore leaves a `.tmp`
directory and an unchanged `latest`: nothing that looks complete is ever half written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from coin_ds import distributed as D

LATEST = "latest"
META = "meta.json"


class CheckpointError(RuntimeError):
    pass


def model_identity(engine, cfg) -> dict:
    """What must match for a checkpoint to be loadable into this run (compared key by key on resume)."""
    from coin_ds.modeling import unwrap

    lm = engine.module.lm
    config = unwrap(lm).config
    # under ZeRO-3 a rank's parameter is an empty placeholder; ds_numel is the full size
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    lora = cfg.lora
    return {
        "architecture": (getattr(config, "architectures", None) or [type(unwrap(lm)).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "parameters": int(n_params),
        "trainable_parameters": int(n_trainable),
        "dtype": cfg.model.dtype,
        "lora": {"enabled": lora.enabled, "r": lora.r, "alpha": lora.alpha,
                 "target_modules": sorted(lora.target_modules)} if lora.enabled else {"enabled": False},
        # ZeRO partitions are per rank: another world size cannot load them
        "world_size": D.world_size(),
    }


def _rng_state() -> dict:
    # plain tensors and ints only, so that loading needs no pickle of arbitrary objects (weights_only=True)
    version, state, gauss = random.getstate()
    return {"python_version": version, "python_state": torch.tensor(state, dtype=torch.int64),
            "python_gauss": gauss, "torch": torch.get_rng_state()}


def _set_rng_state(rng: dict) -> None:
    random.setstate((int(rng["python_version"]), tuple(int(x) for x in rng["python_state"].tolist()),
                     rng["python_gauss"]))
    torch.set_rng_state(rng["torch"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _debug_crash_in_save(step: int) -> None:
    """Test hook: die after DeepSpeed wrote its files but before the checkpoint is published (an interrupted save).

    COIN_DS_DEBUG_CRASH_IN_SAVE=k, and COIN_DS_DEBUG_CRASH_RANK=r to kill only rank r (default: every rank)."""
    rank = os.environ.get("COIN_DS_DEBUG_CRASH_RANK")
    if os.environ.get("COIN_DS_DEBUG_CRASH_IN_SAVE") == str(step) and rank in (None, str(D.rank())):
        print(f"[debug] rank {D.rank()}: simulated crash while saving step {step}", flush=True)
        os._exit(1)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, identity: dict, keep: int) -> Path:
    """Every rank must call this (ZeRO partitions are per rank). Returns the published checkpoint directory."""
    tag = f"step_{step:07d}"
    final, tmp = ckpt_dir / tag, ckpt_dir / f"{tag}.tmp"
    if D.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("*.tmp"):  # leftovers of an interrupted save
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    D.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"step": step, **client_state},
                           save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{D.rank()}.pt")  # each rank's own RNG, beside DeepSpeed's files
    if D.is_main():
        (tmp / META).write_text(json.dumps({"step": step, "model": identity}, indent=2))
    _debug_crash_in_save(step)
    D.barrier()  # every rank's files are on disk before the checkpoint is published
    if D.is_main():
        if final.exists():  # saving the same step again (e.g. the last good state after a NaN)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(ckpt_dir / LATEST, tag)
        if keep > 0:
            tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in tags[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None when there is none."""
    latest = ckpt_dir / LATEST
    if not latest.exists():
        return None
    path = ckpt_dir / latest.read_text().strip()
    if not (path / META).exists():
        raise CheckpointError(f"{latest} names {path.name}, which is missing or incomplete (no {META}); "
                              f"it was not written by this version of coin_ds or was altered")
    return path


def check_identity(path: Path, identity: dict) -> None:
    """A clear error when a checkpoint belongs to another model, adapter setup or world size."""
    saved = json.loads((path / META).read_text()).get("model", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path}: this checkpoint was written for another model or setup and cannot be resumed "
                              f"here ({'; '.join(diffs)}). Use another train.output_dir, or drop --resume.")


def load_checkpoint(engine, ckpt_dir: Path, identity: dict) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns (step, client state)."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint ('{LATEST}' is missing)")
    check_identity(path, identity)
    loaded, client = engine.load_checkpoint(str(ckpt_dir), tag=path.name)
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
    rng_file = path / f"rng_rank{D.rank()}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"{rng_file}: missing (the checkpoint lacks rank {D.rank()}'s RNG state)")
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return int(client["step"]), client
