"""Config: presets < YAML < command line; unknown keys and wrong types name the key; DeepSpeed JSON agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coin_ds.config import ConfigError, load_config, resolve_deepspeed_config

DS = Path(__file__).resolve().parents[1] / "ds_configs"


def test_precedence_and_types(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("preset: paper\ntrain:\n  lr: 2e-4\n  max_steps: 7\nloss:\n  temperature: 0.1\n")
    cfg = load_config(p, ["train.max_steps=9", "--loss.negatives", "global"])
    assert cfg.preset == "paper" and cfg.lora.enabled and cfg.data.template == "coin"  # from the preset
    assert cfg.train.lr == 2e-4 and cfg.loss.temperature == 0.1  # from YAML (2e-4 without a dot is a str in YAML 1.1)
    assert cfg.train.max_steps == 9 and cfg.loss.negatives == "global"  # command line wins
    assert load_config(None, ["lora.target_modules=q_proj,v_proj"]).lora.target_modules == ["q_proj", "v_proj"]


def test_default_is_the_embedded_demo():
    cfg = load_config()
    assert cfg.preset == "demo" and cfg.model.path == "tiny" and cfg.data.train_file is None


@pytest.mark.parametrize("text,needle", [
    ("train:\n  lrr: 1\n", "unknown key 'train.lrr'"),
    ("trian:\n  lr: 1\n", "unknown key 'trian'"),
    ("train:\n  max_steps: ten\n", "train.max_steps: expected an integer"),
    ("lora:\n  enabled: maybe\n", "lora.enabled: expected true/false"),
    ("loss:\n  negatives: everywhere\n", "loss.negatives: 'everywhere' is not one of"),
    ("train: 5\n", "train: expected a mapping"),
])
def test_bad_yaml_names_file_and_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, ["preset=nope"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_deepspeed_json_filled_from_trainer(tmp_path):
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=2", "model.dtype=bfloat16"])
    ds = resolve_deepspeed_config(DS / "zero3.json", cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 12 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3


def test_deepspeed_json_values_are_taken_when_trainer_is_silent(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 5, "gradient_clipping": 0.5}))
    cfg = load_config()
    ds = resolve_deepspeed_config(p, cfg, world_size=1)
    assert cfg.train.micro_batch_size == 5 and cfg.train.max_grad_norm == 0.5 and ds["train_batch_size"] == 5


@pytest.mark.parametrize("ds,overrides,needle", [
    ({"train_micro_batch_size_per_gpu": 5}, ["train.micro_batch_size=4"], "train_micro_batch_size_per_gpu"),
    ({"gradient_accumulation_steps": 8}, ["train.grad_accum=2"], "gradient_accumulation_steps"),
    ({"train_batch_size": 100}, [], "train_batch_size"),
    ({"bf16": {"enabled": True}}, ["model.dtype=float32"], "bf16.enabled"),
])
def test_contradicting_deepspeed_json_is_an_error(tmp_path, ds, overrides, needle):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        resolve_deepspeed_config(p, load_config(None, overrides), world_size=2)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_shipped_deepspeed_configs_resolve():
    for name in ("zero2", "zero3", "zero3_offload"):
        ds = resolve_deepspeed_config(DS / f"{name}.json", load_config(), world_size=2)
        assert ds["train_batch_size"] == 8
