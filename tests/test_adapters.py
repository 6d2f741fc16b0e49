"""LoRA through PEFT on the tiny model, in one process: trainable set, the one-pass forward, continue, mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coin_ds.adapters import AdapterError, apply_lora, check_not_empty, gather_trainable_state, write_adapter
from coin_ds.config import LoraConfig, ModelConfig
from coin_ds.modeling import CoinForward, load_model, load_tokenizer


def _load(path: Path, dtype: str = "float32"):
    cfg = ModelConfig(path=str(path), dtype=dtype)
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok, cfg


def _nudge_lora(lm, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapter is a no-op); give it values so tests can see it act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_only_adapter_weights_train_on_default_targets(tiny_model_dir):
    base, _, mcfg = _load(tiny_model_dir)
    lm = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8), mcfg)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = lm.get_base_model().config.num_hidden_layers
    assert len(trainable) == layers * 4 * 2  # q,k,v,o x (A, B)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    a = dict(lm.named_parameters())[trainable[0]]
    assert a.shape[0] == 4 and lm.peft_config["default"].lora_alpha == 8


def test_unknown_target_module_is_an_error(tiny_model_dir):
    base, _, mcfg = _load(tiny_model_dir)
    with pytest.raises(AdapterError, match="query_key_value"):
        apply_lora(base, LoraConfig(enabled=True, target_modules=["q_proj", "query_key_value"]), mcfg)


def test_one_pass_hidden_and_logits_come_from_the_adapted_model(tiny_model_dir):
    base, tok, mcfg = _load(tiny_model_dir)
    lm = apply_lora(base, LoraConfig(enabled=True, r=4, dropout=0.0), mcfg)
    _nudge_lora(lm)
    lm.eval()
    batch = tok(["Classify the sentiment: great movie", "Is it positive? no"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    hidden, logits, targets, rows = CoinForward(lm)(ids, mask, labels)
    ref = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()  # padded positions get other position ids in CoinForward; only real tokens are compared
    torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], atol=1e-5, rtol=0)
    select = labels[:, 1:] != -100
    torch.testing.assert_close(logits, ref.logits[:, :-1][select], atol=1e-5, rtol=0)
    # and the adapter really acts in that pass: the same forward with the adapter disabled differs
    with lm.disable_adapter():
        plain, *_ = CoinForward(lm)(ids, mask, labels)
    assert (plain[real] - hidden[real]).abs().max() > 1e-3


def _saved_adapter(tmp_path: Path, model_dir: Path, r: int = 4) -> tuple[Path, dict]:
    base, tok, mcfg = _load(model_dir)
    lm = apply_lora(base, LoraConfig(enabled=True, r=r), mcfg)
    _nudge_lora(lm)
    state = gather_trainable_state(lm)
    return write_adapter(lm, state, tmp_path / "adapter", tok), state


def test_write_adapter_is_peft_loadable_and_atomic(tiny_model_dir, tmp_path):
    from peft import PeftModel

    path, state = _saved_adapter(tmp_path, tiny_model_dir)
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter.tmp").exists()
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    base, _, _ = _load(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, str(path))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert got.keys() == state.keys()
    for n, v in state.items():
        torch.testing.assert_close(got[n], v, atol=0, rtol=0)


def test_empty_tensors_are_refused():
    with pytest.raises(AdapterError, match="empty"):
        check_not_empty({"a.lora_A.default.weight": torch.empty(0)}, "adapter")
    with pytest.raises(AdapterError, match="no adapter weights"):
        check_not_empty({}, "adapter")


def test_init_adapter_continues_training_it(tiny_model_dir, tmp_path):
    path, state = _saved_adapter(tmp_path, tiny_model_dir)
    base, _, mcfg = _load(tiny_model_dir)
    lm = apply_lora(base, LoraConfig(enabled=True, r=16, init_adapter=str(path)), mcfg)
    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    assert params.keys() == state.keys()  # the adapter's own r=4, not lora.r=16
    for n, v in state.items():
        torch.testing.assert_close(params[n].detach(), v, atol=0, rtol=0)
    # one optimizer step moves it: it is trainable, not frozen for inference
    opt = torch.optim.SGD(params.values(), lr=0.1)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    lm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any((params[n].detach() - state[n]).abs().max() > 0 for n in state)


def test_adapter_of_another_base_is_a_clear_error(tiny_model_dir, tmp_path):
    from coin_ds.tiny import save_tiny

    path, _ = _saved_adapter(tmp_path, tiny_model_dir)  # hidden 64
    other = save_tiny(tmp_path / "wider", hidden_size=96, layers=2, heads=4)
    base, _, mcfg = _load(other)
    with pytest.raises(AdapterError, match=r"does not match the base model.*q_proj.*\[4, 64\].*\[4, 96\]"):
        apply_lora(base, LoraConfig(enabled=True, init_adapter=str(path)), mcfg)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        apply_lora(base, LoraConfig(enabled=True, init_adapter=str(tmp_path)), mcfg)


def test_same_shapes_under_another_name_only_warns(tiny_model_dir, tmp_path):
    path, _ = _saved_adapter(tmp_path, tiny_model_dir)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = "decapoda-research/llama-7b-hf"
    cfg_file.write_text(json.dumps(cfg))
    base, _, mcfg = _load(tiny_model_dir)
    with pytest.warns(UserWarning, match="decapoda-research"):
        apply_lora(base, LoraConfig(enabled=True, init_adapter=str(path)), mcfg)
