"""LoRA adapters: wrap the base with PEFT (new or continued adapter), and save the adapter from a ZeRO engine.

Under ZeRO-3 the LoRA matrices are partitioned like every other parameter (once they exceed
`stage3_param_persistence_threshold`), so a rank's `state_dict()` holds empty placeholders. Saving therefore gathers
the adapter parameters, a collective every rank must enter, and rank 0 writes; an adapter file of empty tensors (the
most reported ZeRO-3 + LoRA bug) is refused before it is written.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from coin_ds.config import LoraConfig, ModelConfig


class AdapterError(RuntimeError):
    pass


def apply_lora(lm: nn.Module, lora_cfg: LoraConfig, model_cfg: ModelConfig) -> nn.Module:
    """The PEFT-wrapped model: only the adapter is trainable; the frozen base keeps its (ZeRO-3 partitioned) weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if lora_cfg.init_adapter:
        check_adapter_matches(lora_cfg.init_adapter, lm, model_cfg)
        # is_trainable: the loaded adapter keeps requires_grad (PEFT loads adapters frozen for inference by default)
        return PeftModel.from_pretrained(lm, lora_cfg.init_adapter, is_trainable=True)
    missing = [t for t in lora_cfg.target_modules if not any(n.split(".")[-1] == t for n, _ in lm.named_modules())]
    if missing:
        raise AdapterError(f"lora.target_modules: no module named {missing} in {type(lm).__name__}")
    config = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                            target_modules=list(lora_cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(lm, config)


def _adapter_weights_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).exists():
            return path / name
    raise AdapterError(f"lora.init_adapter: {path} has adapter_config.json but no adapter_model.safetensors/.bin")


def _adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    weights = _adapter_weights_file(path)
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_adapter_matches(adapter_dir: str | Path, lm: nn.Module, model_cfg: ModelConfig) -> dict:
    """Raise AdapterError unless the adapter fits this base: its target modules exist and every LoRA matrix's shape
    agrees with the base layer it adapts. A different `base_model_name_or_path` alone only warns (the paper's
    alpaca-lora adapter names a hub id; users load the same weights from a local copy)."""
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").exists():
        raise AdapterError(f"lora.init_adapter: {path} is not a PEFT adapter directory (no adapter_config.json)")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"lora.init_adapter: {path} is a {config.get('peft_type')} adapter, not LoRA")
    base_name = config.get("base_model_name_or_path") or ""
    linears = {name: mod for name, mod in lm.named_modules() if hasattr(mod, "in_features")}
    problems = []
    for key, shape in _adapter_shapes(path).items():
        # base_model.model.<module path>.lora_A.weight  (PEFT strips the adapter name when saving)
        for part in (".lora_A.", ".lora_B."):
            if part not in key:
                continue
            module = key.split(part)[0].removeprefix("base_model.model.")
            base = linears.get(module)
            if base is None:
                problems.append(f"{module}: not a linear layer of the base model")
                continue
            want = (shape[0], base.in_features) if part == ".lora_A." else (base.out_features, shape[1])
            if shape != want:
                problems.append(f"{module}{part.rstrip('.')}: adapter {list(shape)}, base needs {list(want)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise AdapterError(f"lora.init_adapter: {path} does not match the base model {model_cfg.path!r} "
                           f"(adapter trained on {base_name or 'an unnamed base'!r}): {shown}")
    if base_name and Path(base_name).name != Path(model_cfg.path).name and base_name != model_cfg.path:
        warnings.warn(f"adapter {path} was trained on {base_name!r}, loading it on {model_cfg.path!r}; "
                      f"layer shapes agree, so continuing", stacklevel=3)
    return config


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gather_trainable_state(module: nn.Module, prefix_strip: str = "") -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters, gathered from ZeRO-3 partitions where needed.

    A collective under ZeRO-3: every rank must call it (every rank gets the full tensors)."""
    named = [(n.removeprefix(prefix_strip), p) for n, p in module.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if _is_partitioned(p)]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def check_not_empty(state: dict[str, torch.Tensor], where: str) -> None:
    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state:
        raise AdapterError(f"{where}: no adapter weights to save")
    if empty:
        raise AdapterError(f"{where}: {len(empty)} adapter tensor(s) are empty (ZeRO-3 partitions not gathered), "
                           f"e.g. {empty[0]}")


def write_adapter(peft_model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, tokenizer=None) -> Path:
    """PEFT's own save_pretrained with the given (gathered) state, into a temporary folder renamed into place."""
    path = Path(path)
    check_not_empty(state, str(path))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def save_adapter(engine, path: str | Path, tokenizer=None) -> Path:
    """Write the engine's LoRA adapter as a PEFT directory (adapter_config.json + adapter_model.safetensors).

    Every rank must call this (ZeRO-3 gathers collectively); rank 0 writes, the others wait for it."""
    import torch.distributed as dist

    peft_model = engine.module.lm
    state = gather_trainable_state(peft_model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = None
    if rank == 0:
        try:
            write_adapter(peft_model, state, path, tokenizer)
        except Exception as e:  # noqa: BLE001  (re-raised on every rank after the barrier, so no rank hangs)
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [repr(error) if error else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] and error is None:
            raise AdapterError(f"rank 0 failed to save the adapter: {box[0]}")
    if error:
        raise error
    return Path(path)
