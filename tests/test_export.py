"""ZeRO-3 LoRA (and QLoRA) on 2 CPU ranks, then export round trips in a plain single process.

Adapters must really be partitioned for these tests to mean anything, so the DeepSpeed JSON sets
`stage3_param_persistence_threshold: 0` (SPEC §6): with the default, LoRA matrices stay whole on every rank and a
wrong gather would still pass.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import DEEPSPEED, PYTHON, ROOT, subprocess_env

# One 2-rank job: build the engine the trainer builds, train a few COIN steps, checkpoint, save the adapter, and record
# what the trained engine itself computes, for the single-process side of the round trip to compare against.
WORKER = r'''
import json, sys, traceback
from pathlib import Path
import torch
from coin_ds import distributed as D
from coin_ds.adapters import save_adapter
from coin_ds.config import load_config, resolve_deepspeed_config
from coin_ds.data.batching import TripleSampler, collate
from coin_ds.modeling import load_tokenizer, unwrap
from coin_ds.train import build_engine, forward_loss, prepare_data

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the deepspeed launcher
out, ds_path, overrides = Path(argv[0]), argv[1], argv[2:]
cfg = load_config(None, overrides)
D.init()
ds = resolve_deepspeed_config(ds_path, cfg, D.world_size())
if D.is_main():
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "deepspeed": ds}))
torch.manual_seed(cfg.train.seed)
tok = load_tokenizer(cfg.model, cfg.train.seed)
data = prepare_data(cfg, tok)
engine, _ = build_engine(cfg, ds, tok, total_steps=10)
lm = engine.module.lm
attn = unwrap(lm).model.layers[0].self_attn.q_proj
info = {"rank": D.rank(), "base_type": type(attn.base_layer).__name__,
        "base_local": attn.base_layer.weight.ds_tensor.numel(), "base_full": attn.base_layer.weight.ds_numel,
        "lora_local": attn.lora_A["default"].weight.ds_tensor.numel(),
        "lora_full": attn.lora_A["default"].weight.ds_numel,
        "trainable": sorted(n for n, p in lm.named_parameters() if p.requires_grad)}
enc = tok(["Classify the sentiment of the review.\ngreat acting", "Answer yes or no.\nIs water wet?"],
          padding=True, return_tensors="pt")
ids, mask = enc["input_ids"], enc["attention_mask"]

def logits():
    engine.eval()
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=mask).logits.float()

with lm.disable_adapter():
    base_logits = logits()
engine.train()
sampler = TripleSampler([t.length for t in data.train], cfg.train.micro_batch_size, D.rank(), D.world_size(),
                        cfg.train.seed, False)
losses = []
for _ in range(3):
    batch = collate([data.train[i] for i in sampler.next_batch()], tok.pad_token_id, cfg.data.padding_side)
    result = forward_loss(engine, batch, cfg)
    engine.backward(result.loss)
    engine.step()
    losses.append(result.l_gen)
try:
    engine.save_checkpoint(str(out / "checkpoints"), tag="step_0000003")
    info["checkpoint_error"] = None
except Exception as e:
    info["checkpoint_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
save_adapter(engine, out / "adapter", tok)
trained = logits()
if D.is_main():
    torch.save({"info": info, "ids": ids, "mask": mask, "base_logits": base_logits, "logits": trained,
                "losses": losses}, out / "engine.pt")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_json(tmp: Path, threshold: int = 0) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    path = tmp / "zero3_threshold0.json"
    path.write_text(json.dumps(ds))
    return path


def run_worker(tmp: Path, model_dir: Path, *overrides: str, ranks: int = 2, timeout: int = 240) -> dict:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    out = tmp / "run"
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script),
           str(out), str(zero3_json(tmp)), f"model.path={model_dir}", "lora.enabled=true", "lora.r=4",
           "lora.dropout=0.0", "data.synthetic_per_task=24", "data.eval_triples=8", "train.micro_batch_size=2",
           "train.lr=0.01", "train.warmup_ratio=0.0", *overrides]
    proc = subprocess.run(cmd, cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "engine.pt", weights_only=False)


def base_with_adapter(model_dir: Path, adapter: Path, qlora: bool = False):
    from peft import PeftModel

    from coin_ds.config import ModelConfig
    from coin_ds.modeling import load_model, load_tokenizer

    cfg = ModelConfig(path=str(model_dir), dtype="bfloat16" if qlora else "float32")
    base = load_model(cfg, load_tokenizer(cfg), qlora=qlora)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3_lora")
    return tmp / "run", run_worker(tmp, tiny_model_dir)


@pytest.mark.slow
def test_adapter_and_base_are_partitioned_and_only_the_adapter_trains(lora_run):
    _, rec = lora_run
    info = rec["info"]
    assert info["base_local"] * 2 == info["base_full"]  # the frozen base stays split over the 2 ranks
    assert info["lora_local"] * 2 == info["lora_full"]  # and so is the adapter (threshold 0)
    assert info["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in info["trainable"])
    assert info["checkpoint_error"] is None


@pytest.mark.slow
def test_saved_adapter_has_full_trained_tensors(lora_run):
    from safetensors.torch import load_file

    run, rec = lora_run
    state = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(state) == len(rec["info"]["trainable"])
    hidden = 64  # the tiny_model_dir fixture
    for key, t in state.items():
        assert t.shape == ((4, hidden) if ".lora_A." in key else (hidden, 4)), key
        assert t.abs().sum() > 0, key  # B starts at zero: all-zero means untrained or a lost gather
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.slow
def test_exported_adapter_on_a_fresh_base_reproduces_the_engine(lora_run, tiny_model_dir):
    run, rec = lora_run
    model = base_with_adapter(tiny_model_dir, run / "adapter")
    with torch.no_grad():
        got = model(input_ids=rec["ids"], attention_mask=rec["mask"]).logits
        with model.disable_adapter():
            base = model(input_ids=rec["ids"], attention_mask=rec["mask"]).logits
    torch.testing.assert_close(base, rec["base_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, rec["logits"], atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3  # training moved the model: the comparison is not vacuous


@pytest.mark.slow
def test_export_from_the_zero3_checkpoint_matches_and_merges(lora_run, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coin_ds.export import main

    run, rec = lora_run
    assert main([str(run), "--merge", "--out", str(tmp_path / "exp")]) == 0
    ours = load_file(tmp_path / "exp" / "adapter" / "adapter_model.safetensors")
    live = load_file(run / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == live.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], live[k], atol=0, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=rec["ids"], attention_mask=rec["mask"]).logits
    torch.testing.assert_close(got, rec["logits"], atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "exp" / "merged")
    assert tok("hello").input_ids == AutoTokenizer.from_pretrained(tiny_model_dir)("hello").input_ids
    # the same checkpoint by its step folder, bf16 merged weights
    assert main([str(run / "checkpoints" / "step_0000003"), "--merge", "--dtype", "bf16",
                 "--out", str(tmp_path / "bf16")]) == 0
    weights = load_file(tmp_path / "bf16" / "merged" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_full_finetune_export_fp32_equals_the_consolidated_final_model(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from coin_ds.export import main

    out = tmp_path / "full"
    cmd = [PYTHON, str(ROOT / "coin_ds" / "train.py"), "--deepspeed", str(zero3_json(tmp_path)),
           f"model.path={tiny_model_dir}", "train.max_steps=2", f"train.output_dir={out}",
           "data.synthetic_per_task=24", "data.eval_triples=8", "train.micro_batch_size=2", "train.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert main([str(out), "--dtype", "fp32"]) == 0
    exported = load_file(out / "export" / "model_fp32" / "model.safetensors")
    final = load_file(out / "final_model" / "model.safetensors")  # the trainer's own gathered save
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert exported.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(exported[k], final[k], atol=0, rtol=0)
    assert any((exported[k] - initial[k]).abs().max() > 0 for k in initial)  # it trained
    assert main([str(out), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(out / "export" / "model_bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_export_errors_are_clear(tmp_path, capsys):
    from coin_ds.export import main

    assert main([str(tmp_path / "nope")]) == 2
    assert "no such run" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    assert main([str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main([str(tmp_path), "--dtype", "int3"]) == 2
    assert "--dtype" in capsys.readouterr().err


@pytest.mark.slow
def test_qlora_under_zero3_two_ranks(tiny_model_dir, tmp_path):
    """What 4-bit NF4 QLoRA does under ZeRO-3 on this CPU: the base is Linear4bit, partitioned, and computes what the
    same 4-bit base computes in one plain process; the adapter trains and round-trips onto a fresh 4-bit base."""
    pytest.importorskip("bitsandbytes")
    rec = run_worker(tmp_path, tiny_model_dir, "lora.qlora=true", "model.dtype=bfloat16")
    info = rec["info"]
    assert info["base_type"] == "Linear4bit"
    assert info["base_local"] * 2 == info["base_full"]
    assert info["checkpoint_error"] is None, info["checkpoint_error"]
    model = base_with_adapter(tiny_model_dir, tmp_path / "run" / "adapter", qlora=True)
    with torch.no_grad():
        got = model(input_ids=rec["ids"], attention_mask=rec["mask"]).logits.float()
        with model.disable_adapter():
            base = model(input_ids=rec["ids"], attention_mask=rec["mask"]).logits.float()
    torch.testing.assert_close(base, rec["base_logits"], atol=1e-2, rtol=0)
    torch.testing.assert_close(got, rec["logits"], atol=1e-2, rtol=0)
    assert (got - base).abs().max() > 0.05
