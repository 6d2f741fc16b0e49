"""Export a run's DeepSpeed checkpoint (ZeRO-1/2/3, any number of ranks) as files other tools load.

    python -m coin_ds.export RUN_DIR [--tag step_0000020] [--merge] [--dtype fp32|bf16|fp16] [--out DIR]
    coin-ds export RUN_DIR ...

RUN_DIR is a training output dir (with config.json and checkpoints/), its checkpoints/ folder, or one step folder.
- LoRA runs: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for
  `PeftModel.from_pretrained`; with --merge also a full transformers directory (base + adapter merged, tokenizer) for
  `AutoModelForCausalLM.from_pretrained`.
- Full fine-tune runs: a transformers directory of consolidated weights in --dtype.

One process, no GPU and no process group: DeepSpeed's zero_to_fp32 rebuilds the fp32 master weights from the
per-rank optimizer partitions, the base comes from the run's model config, and PEFT writes the files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from coin_ds.adapters import AdapterError
from coin_ds.config import Config, apply_values
from coin_ds.modeling import DTYPES, ModelLoadError, load_model, load_tokenizer

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
               "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ExportError(RuntimeError):
    pass


@dataclass
class RunCheckpoint:
    run_dir: Path
    ckpt_root: Path  # the folder DeepSpeed saved into (holds `latest`)
    tag: str
    config: Config


def locate(path: str | Path, tag: str | None = None) -> RunCheckpoint:
    """Find the run config and the checkpoint tag from a run dir, its checkpoints/ dir or a step dir."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such run or checkpoint directory")
    if (path / "checkpoints").is_dir():
        run_dir, root = path, path / "checkpoints"
    elif (path / "latest").exists() or any(path.glob("step_*")):
        run_dir, root = path.parent, path
    elif path.name.startswith("step_") or any(path.glob("*model_states.pt")):
        run_dir, root, tag = path.parent.parent, path.parent, tag or path.name
    else:
        raise ExportError(f"{path}: not a run directory (no checkpoints/) nor a DeepSpeed checkpoint")
    if tag is None:
        if (root / "latest").exists():
            tag = (root / "latest").read_text().strip()
        else:
            # a `.tmp` folder is a save that never finished (coin_ds.checkpoint renames it when complete)
            tags = sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            if not tags:
                raise ExportError(f"{root}: no checkpoint in it")
            tag = tags[-1]
    if not (root / tag).is_dir():
        raise ExportError(f"{root / tag}: checkpoint tag not found")
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        raise ExportError(f"{cfg_file}: missing; export rebuilds the model from the run's config")
    cfg = Config()
    saved = json.loads(cfg_file.read_text())["config"]
    apply_values(cfg, {k: v for k, v in saved.items() if k != "preset"}, str(cfg_file))
    cfg.preset = saved.get("preset")
    return RunCheckpoint(run_dir, root, tag, cfg)


def checkpoint_state(ck: RunCheckpoint, trainable_only: bool) -> dict[str, torch.Tensor]:
    """fp32 weights from the ZeRO partitions of every rank, keys as in the base/PEFT model (the `lm.` prefix gone)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ck.ckpt_root), tag=ck.tag,
                                                     exclude_frozen_parameters=trainable_only)
    return {k.removeprefix("lm."): v for k, v in state.items()}


def build_lm(cfg: Config, dtype: str):
    """The run's model rebuilt in one process: base in `dtype` (never 4-bit: QLoRA adapters merge into the full
    precision base), plus the run's LoRA structure."""
    cfg.model.dtype = dtype
    tokenizer = load_tokenizer(cfg.model, cfg.train.seed)
    lm = load_model(cfg.model, tokenizer, cfg.train.seed, ds_config=None, qlora=False)
    if cfg.lora.enabled:
        from coin_ds.adapters import apply_lora

        lm = apply_lora(lm, cfg.lora, cfg.model)
    return lm, tokenizer


def _load_into(lm, state: dict[str, torch.Tensor], lora: bool) -> None:
    # state_dict names every alias of a tied weight (lm_head.weight = embed_tokens.weight); zero_to_fp32 may write either
    own = lm.state_dict(keep_vars=True)
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ExportError(f"checkpoint tensors the rebuilt model does not have (different config?): {unknown[:3]}")
    wanted = [n for n, p in lm.named_parameters() if p.requires_grad or not lora]
    covered = {id(own[k]) for k in state}
    missing = [n for n in wanted if id(own[n]) not in covered]
    if missing:
        raise ExportError(f"checkpoint lacks {len(missing)} weight(s), e.g. {missing[0]}")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ExportError(f"{k}: checkpoint {list(v.shape)}, model {list(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))


def _save_dir(model, tokenizer, out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export(path: str | Path, out: str | Path | None = None, merge: bool = False, dtype: str = "fp32",
           tag: str | None = None) -> dict[str, str]:
    """Write the exports; returns {"adapter"|"merged"|"model": directory}."""
    from coin_ds.adapters import gather_trainable_state, write_adapter

    if dtype not in DTYPE_NAMES:
        raise ExportError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16")
    ck = locate(path, tag)
    out = Path(out) if out else ck.run_dir / "export"
    lora = ck.config.lora.enabled
    state = checkpoint_state(ck, trainable_only=lora)
    # adapters are written from fp32 masters; a merged / full model is built in fp32 and cast at the end
    lm, tokenizer = build_lm(ck.config, "float32")
    _load_into(lm, state, lora)
    written = {}
    if lora:
        written["adapter"] = str(write_adapter(lm, gather_trainable_state(lm), out / "adapter", tokenizer))
        if merge:
            merged = lm.merge_and_unload().to(DTYPES[DTYPE_NAMES[dtype]])
            written["merged"] = str(_save_dir(merged, tokenizer, out / "merged"))
    else:
        if merge:
            print("[export] --merge ignored: a full fine-tune has no adapter to merge", file=sys.stderr)
        written["model"] = str(_save_dir(lm.to(DTYPES[DTYPE_NAMES[dtype]]), tokenizer, out / f"model_{dtype}"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coin-ds export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run dir, its checkpoints/ dir, or a step_* checkpoint dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/export)")
    p.add_argument("--tag", help="checkpoint tag (default: `latest`)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write base + adapter merged as a full model")
    p.add_argument("--dtype", default="fp32", help="weights of merged/full models: fp32 | bf16 | fp16")
    args = p.parse_args(argv)
    try:
        written = export(args.path, args.out, args.merge, args.dtype, args.tag)
    except (ExportError, ModelLoadError, AdapterError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    for kind, folder in written.items():
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        print(f"{kind:<8} {folder}  ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
