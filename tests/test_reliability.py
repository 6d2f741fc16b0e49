"""Bad input catalogue and safe loading (issue #8; the table is docs/reliability.md).

Every bad input either raises an error that names the file, the line and the field, or is skipped and counted in the
run summary's `data` section. The multi-process cases (resume, dying rank, NaN) are in test_reliability_e2e.py.
"""

from __future__ import annotations

import json
import random
import re
import socket
from pathlib import Path

import pytest
import torch

from coin_ds import checkpoint as C
from coin_ds.config import ModelConfig, load_config
from coin_ds.data.records import Record, RecordError, check_label, load_records
from coin_ds.data.synthetic import TASKS, generate_records
from coin_ds.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"task": "t", "instruction": "Say yes or no.", "input": "x", "output": "yes"}


def write_lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def bad_record(tmp_path: Path, line: str | bytes) -> RecordError:
    """A file whose line 2 is `line` after one good line; returns the error."""
    p = write_lines(tmp_path / "train.jsonl", json.dumps(GOOD), line)
    with pytest.raises(RecordError) as e:
        load_records(p)
    assert e.value.path == str(p) and e.value.line == 2 and str(p) in str(e.value) and "line 2" in str(e.value)
    return e.value


# --- records: errors naming file, line and field ---------------------------------------------------------------------

def test_malformed_json_line(tmp_path):
    e = bad_record(tmp_path, '{"task": "t", "instruction": "i",')
    assert "malformed JSON" in str(e)


def test_line_that_is_not_an_object(tmp_path):
    e = bad_record(tmp_path, json.dumps(["t", "i", "x", "y"]))
    assert "expected a JSON object" in str(e)


@pytest.mark.parametrize("name", ["task", "instruction", "input", "output"])
def test_missing_field(tmp_path, name):
    e = bad_record(tmp_path, json.dumps({k: v for k, v in GOOD.items() if k != name}))
    assert e.field == name and "missing required field" in str(e) and f"field '{name}'" in str(e)


@pytest.mark.parametrize("name", ["task", "instruction"])
def test_empty_field(tmp_path, name):
    e = bad_record(tmp_path, json.dumps({**GOOD, name: "  "}))
    assert e.field == name and "empty string" in str(e)


def test_empty_output(tmp_path):
    e = bad_record(tmp_path, json.dumps({**GOOD, "output": ""}))
    assert e.field == "output" and "empty string" in str(e)


def test_wrong_field_type(tmp_path):
    e = bad_record(tmp_path, json.dumps({**GOOD, "input": 42}))
    assert e.field == "input" and "expected a string, got int" in str(e)


def test_non_utf8_bytes(tmp_path):
    e = bad_record(tmp_path, b'{"task": "t", "instruction": "caf\xe9", "input": "x", "output": "y"}')
    assert "not valid UTF-8" in str(e)


def test_label_not_among_the_tasks_label_words(tmp_path):
    words = {name: task.label_words for name, task in TASKS.items()}
    line = json.dumps({"task": "sentiment", "instruction": "Positive or negative?", "input": "ok", "output": "meh"})
    p = write_lines(tmp_path / "train.jsonl", json.dumps(GOOD), line)
    load_records(p)  # without label words: accepted
    with pytest.raises(RecordError) as e:
        load_records(p, label_words=words)
    assert e.value.line == 2 and e.value.field == "output" and "not a label word of task 'sentiment'" in str(e.value)
    check_label(Record("my_own_task", "i", "x", "anything"), words)  # a user's own task: any output


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(RecordError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(RecordError, match="no records in file"):
        load_records(write_lines(tmp_path / "blank.jsonl", "", "  "))


# --- records: skipped and counted in the run summary -----------------------------------------------------------------

def prepare(tmp_path: Path, records: list[dict], *overrides: str):
    from coin_ds.train import prepare_data

    p = tmp_path / "train.jsonl"
    write_lines(p, *(json.dumps(r) for r in records))
    cfg = load_config(None, [f"data.train_file={p}", "data.eval_triples=0", *overrides])
    return prepare_data(cfg, build_tokenizer())


def embedded(n: int = 6) -> list[dict]:
    return [r.to_dict() for r in generate_records(n, seed=1, tasks=["sentiment"])]


def test_task_with_a_single_instance_is_skipped_and_counted(tmp_path):
    lonely = {"task": "lonely", "instruction": "Answer a or b.", "input": "q", "output": "a",
              "paraphrases": ["Reply a or b."]}
    data = prepare(tmp_path, [*embedded(), lonely])
    assert data.report["records"] == 7 and data.report["train_triples"] == 6
    assert list(data.report["skipped"].values()) == [1] and "no hard negative" in next(iter(data.report["skipped"]))


def test_task_with_one_instruction_and_no_paraphrase_is_skipped_and_counted(tmp_path):
    plain = [{"task": "plain", "instruction": "Answer a or b.", "input": f"q{i}", "output": "ab"[i % 2]}
             for i in range(4)]
    data = prepare(tmp_path, [*embedded(), *plain])
    assert data.report["train_triples"] == 6 and sum(data.report["skipped"].values()) == 4
    assert "no positive" in next(iter(data.report["skipped"]))


def test_too_long_input_is_truncated_and_counted(tmp_path):
    long_input = {**embedded(2)[0], "input": " ".join(["word"] * 300)}
    data = prepare(tmp_path, [*embedded(), long_input], "data.max_length=96")
    assert data.report["inputs_truncated"] >= 1 and data.report["too_long"] == 0
    assert max(t.length for t in data.train) <= 96


def test_too_long_output_is_skipped_and_counted(tmp_path):
    rows = embedded()
    rows[0] = {**rows[0], "task": "longout", "output": " ".join(["word"] * 300)}
    rows[1] = {**rows[1], "task": "longout", "output": "short"}
    data = prepare(tmp_path, rows, "data.max_length=96")
    assert data.report["too_long"] >= 1
    assert data.report["train_triples"] + data.report["too_long"] == data.report["triples"]


# --- evaluation records and external instruction files (coin_ds.eval) -----------------------------------------------

def eval_words() -> dict[str, list[str]]:
    return {name: list(task.label_words) for name, task in TASKS.items()}


@pytest.mark.parametrize("record,needle", [
    ({"task": "nosuchtask", "input": "x", "label": "yes"}, "task 'nosuchtask' has no label words"),
    ({"task": "sentiment", "input": "x", "label": "meh"}, "label 'meh' is not a label word of 'sentiment'"),
    ({"task": "sentiment", "input": "x"}, "missing or non-string field(s) label"),
])
def test_bad_evaluation_record(tmp_path, record, needle):
    from coin_ds.eval.run import EvalError
    from coin_ds.eval.run import load_records as load_eval_records

    p = write_lines(tmp_path / "eval.jsonl", json.dumps({"task": "sentiment", "input": "ok", "label": "positive"}),
                    json.dumps(record))
    with pytest.raises(EvalError) as e:
        load_eval_records(str(p), eval_words())
    assert f"{p}:2:" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("content,needle", [
    (["a", "b"], "expected an object {level: {task: [instructions]}}"),
    ({"clean": ["Say positive or negative."]}, "['clean']: expected an object {task: [instructions]}"),
    ({"clean": {"sst2": "Say positive or negative."}}, "['clean']['sst2']: expected a list of strings"),
    ({"textfooler": {"sst2": ["Say positive or negative."]}}, "no 'clean' level"),
])
def test_external_instruction_file_of_the_wrong_shape(tmp_path, content, needle):
    from coin_ds.eval.instructions import InstructionError, load_sets

    p = tmp_path / "prompts.json"
    p.write_text(json.dumps(content))
    with pytest.raises(InstructionError) as e:
        load_sets(p, eval_words())
    assert str(p) in str(e.value) and needle in str(e.value)


# --- model, adapter, checkpoint --------------------------------------------------------------------------------------

def test_missing_model_path_is_an_error_not_a_download(tmp_path):
    from coin_ds.modeling import ModelLoadError, resolve_model_path

    with pytest.raises(ModelLoadError, match="not a local directory"):
        resolve_model_path(ModelConfig(path=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="never downloads"):
        resolve_model_path(ModelConfig(path="HuggingFaceTB/SmolLM2-135M"))  # a hub id is not a path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(ModelConfig(path=str(tmp_path / "empty")))


IDENTITY = {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "vocab_size": 512, "parameters": 100_000, "trainable_parameters": 100_000, "dtype": "float32",
            "lora": {"enabled": False}, "world_size": 2}


class FakeEngine:
    """Writes and reads files the way DeepSpeed's save/load_checkpoint do; `die_in_save` simulates a kill."""

    def __init__(self, die_in_save: bool = False):
        self.die_in_save = die_in_save

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # `latest` is ours to write, last
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "client.json").write_text(json.dumps(client_state))
        if self.die_in_save:
            raise KeyboardInterrupt("killed in the middle of a save")
        (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"weights")

    def load_checkpoint(self, load_dir, tag):
        d = Path(load_dir) / tag
        return str(d), json.loads((d / "client.json").read_text())


def test_interrupted_save_never_looks_complete(tmp_path):
    ckpt = tmp_path / "checkpoints"
    C.save_checkpoint(FakeEngine(), ckpt, 4, {"sampler": {"epoch": 0, "position": 4}}, IDENTITY, keep=2)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(FakeEngine(die_in_save=True), ckpt, 8, {"sampler": {}}, IDENTITY, keep=2)
    assert (ckpt / "latest").read_text() == "step_0000004"
    assert not (ckpt / "step_0000008").exists() and (ckpt / "step_0000008.tmp").exists()
    assert C.latest_checkpoint(ckpt) == ckpt / "step_0000004"
    step, client = C.load_checkpoint(FakeEngine(), ckpt, IDENTITY)
    assert step == 4 and client["sampler"] == {"epoch": 0, "position": 4}
    C.save_checkpoint(FakeEngine(), ckpt, 8, {"sampler": {}}, IDENTITY, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000004", "step_0000008"]  # .tmp cleaned


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "checkpoints"
    C.save_checkpoint(FakeEngine(), ckpt, 4, {"sampler": {}}, IDENTITY, keep=2)
    other = {**IDENTITY, "hidden_size": 96, "parameters": 180_000, "lora": {"enabled": True, "r": 8}}
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(FakeEngine(), ckpt, other)
    msg = str(e.value)
    assert str(ckpt / "step_0000004") in msg and "another model" in msg
    assert "hidden_size: checkpoint 64, this run 96" in msg and "parameters" in msg and "lora" in msg
    with pytest.raises(C.CheckpointError, match="world_size: checkpoint 2, this run 4"):
        C.load_checkpoint(FakeEngine(), ckpt, {**IDENTITY, "world_size": 4})


def test_latest_pointing_at_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step_0000009")
    with pytest.raises(C.CheckpointError, match="missing or incomplete"):
        C.latest_checkpoint(tmp_path)


# --- safe loading ----------------------------------------------------------------------------------------------------

def test_rng_state_round_trips_with_weights_only(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    torch.save(C._rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    C._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_no_unsafe_deserialisation_in_the_package():
    """Weights come from safetensors or torch.load(weights_only=True); nothing unpickles arbitrary objects."""
    offenders = []
    for path in (ROOT / "coin_ds").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path.name}: {m.group(0)}")
        for bad in ("pickle.load", "trust_remote_code=True", "weights_only=False"):
            if bad in text:
                offenders.append(f"{path.name}: {bad}")
    assert not offenders, offenders
    assert ModelConfig().trust_remote_code is False


def test_loading_never_touches_the_network(tiny_model_dir, monkeypatch):
    """With every socket connection refused, the tokenizer and the model load from the local directory."""
    from coin_ds.modeling import load_model, load_tokenizer

    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network blocked by the test: {address}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    cfg = ModelConfig(path=str(tiny_model_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    assert model.config.hidden_size == 64 and tok("hello")["input_ids"]
    assert attempts == []


def test_the_trainer_is_offline_even_when_the_environment_does_not_say_so():
    import subprocess
    import sys

    from conftest import subprocess_env

    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                   "TRANSFORMERS_OFFLINE")}
    code = "import coin_ds.train, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-2000:]
