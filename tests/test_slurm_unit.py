"""SLURM launch logic from faked SLURM environments (no SLURM needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from coin_ds import slurm

REPO = Path(__file__).resolve().parents[1]

# What sbatch sets for `sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8` on gpu[01-03,07].
FOUR_BY_EIGHT = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[01-03,07]",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_GPUS_PER_NODE": "8",
    "SLURM_CPUS_PER_TASK": "8",
}


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("node1", ["node1"]),
        ("a-b,c", ["a-b", "c"]),
        ("n[008-010],m1", ["n008", "n009", "n010", "m1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[007-9]", ["n007", "n008", "n009"]),
        ("gpu[1,3]", ["gpu1", "gpu3"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("gpu[01-02]-ib,cpu7", ["gpu01-ib", "gpu02-ib", "cpu7"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01-03]", "gpu[a-b]", "gpu[5-3]", "gpu[1-]"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        slurm.expand_nodelist(bad)


def test_hostnames_without_scontrol_uses_the_pure_expander(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    assert slurm.hostnames("gpu[01-03,07]") == ["gpu01", "gpu02", "gpu03", "gpu07"]


def test_hostnames_falls_back_when_scontrol_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no conf"))
    assert slurm.hostnames("n[1-2]") == ["n1", "n2"]


def test_rendezvous_four_nodes_eight_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # expand SLURM_JOB_NODELIST in Python
    rdv = slurm.rendezvous_from_env(FOUR_BY_EIGHT)
    assert rdv.hosts == ("gpu01", "gpu02", "gpu03", "gpu07")
    assert (rdv.master_addr, rdv.master_port) == ("gpu01", 20000 + 123456 % 20000)
    assert (rdv.nnodes, rdv.ranks_per_node, rdv.world_size, rdv.gpus_per_node) == (4, 8, 32, 8)
    assert rdv.node_rank("gpu07") == 3
    assert rdv.ranks_of("gpu01") == list(range(0, 8))
    assert rdv.ranks_of("gpu07") == list(range(24, 32))
    assert slurm.launch_env(rdv) == {
        "MASTER_ADDR": "gpu01",
        "MASTER_PORT": "23456",
        "NNODES": "4",
        "GPUS_PER_NODE": "8",
        "WORLD_SIZE": "32",
    }


def test_srun_command_four_nodes_eight_gpus() -> None:
    rdv = slurm.rendezvous_from_env(FOUR_BY_EIGHT, hosts=["gpu01", "gpu02", "gpu03", "gpu07"])
    train = ["/venv/bin/python", "coin_ds/train.py", "--deepspeed", "ds_configs/zero3.json", "--resume",
             "train.output_dir=runs/coin_ds-123456", "--config", "run.yaml"]
    assert slurm.srun_command(rdv, train, python="/venv/bin/python") == [
        "srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--cpus-per-task=8", "--gpus-per-node=8",
        "--kill-on-bad-exit=1", "--label",
        "/venv/bin/python", "-m", "coin_ds.slurm", "rank", "--", *train,
    ]


def test_rendezvous_cpu_only_job_uses_tasks_per_node() -> None:
    # `sbatch --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0` on one node, as in the real test.
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "0", "SLURM_CPUS_PER_TASK": "1"}
    rdv = slurm.rendezvous_from_env(env, hosts=["vm"])
    assert (rdv.master_addr, rdv.master_port, rdv.world_size, rdv.gpus_per_node) == ("vm", 20007, 2, 0)
    assert slurm.srun_command(rdv, ["python", "t.py"]) == [
        "srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
        "--kill-on-bad-exit=1", "--label", "python", "-m", "coin_ds.slurm", "rank", "--", "python", "t.py",
    ]


@pytest.mark.parametrize(
    "extra, ranks, gpus",
    [
        ({"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_NTASKS_PER_NODE": "8"}, 4, 4),  # GPUs win: one rank per GPU
        ({"SLURM_GPUS_ON_NODE": "2"}, 2, 2),  # --gres=gpu:2 sets only GPUS_ON_NODE
        ({}, 1, 0),  # nothing given: one rank per node
    ],
)
def test_ranks_per_node(extra: dict[str, str], ranks: int, gpus: int) -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "2", **extra}
    rdv = slurm.rendezvous_from_env(env, hosts=["a", "b"])
    assert (rdv.ranks_per_node, rdv.gpus_per_node, rdv.world_size) == (ranks, gpus, 2 * ranks)


def test_master_port_override_and_node_count_mismatch() -> None:
    env = {**FOUR_BY_EIGHT, "MASTER_PORT": "29500", "MASTER_ADDR": "gpu02-ib"}
    rdv = slurm.rendezvous_from_env(env, hosts=["gpu01", "gpu02", "gpu03", "gpu07"])
    assert (rdv.master_addr, rdv.master_port) == ("gpu02-ib", 29500)
    with pytest.raises(ValueError, match="SLURM_JOB_NUM_NODES=4"):
        slurm.rendezvous_from_env(FOUR_BY_EIGHT, hosts=["gpu01", "gpu02"])


def test_rank_env_last_rank_of_four_by_eight() -> None:
    # What srun sets in the last task of the 32-task step, plus what `coin_ds.slurm srun` exported.
    task = {"SLURM_PROCID": "31", "SLURM_LOCALID": "7", "SLURM_NODEID": "3", "SLURM_NTASKS": "32",
            "SLURM_STEP_NUM_NODES": "4", "SLURM_CPUS_PER_TASK": "8", "MASTER_ADDR": "gpu01", "MASTER_PORT": "23456"}
    assert slurm.rank_env(task) == {
        "RANK": "31", "LOCAL_RANK": "7", "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "3",
        "MASTER_ADDR": "gpu01", "MASTER_PORT": "23456", "OMP_NUM_THREADS": "8",
    }
    assert "OMP_NUM_THREADS" not in slurm.rank_env({**task, "OMP_NUM_THREADS": "4"})
    with pytest.raises(KeyError, match="MASTER_ADDR"):
        slurm.rank_env({k: v for k, v in task.items() if k != "MASTER_ADDR"})


def test_cli_srun_execs_srun_with_the_rendezvous(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for key, value in FOUR_BY_EIGHT.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    monkeypatch.setattr(slurm.sys, "executable", "/venv/bin/python")
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(slurm.os, "execvp", lambda f, a: calls.append((f, a, dict(slurm.os.environ))))
    slurm.main(["srun", "--", "python", "coin_ds/train.py", "--resume"])
    [(file, args, env)] = calls
    assert file == "srun" and args[:4] == ["srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8"]
    assert args[-7:] == ["-m", "coin_ds.slurm", "rank", "--", "python", "coin_ds/train.py", "--resume"]
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["WORLD_SIZE"]) == ("gpu01", "23456", "32")
    out = capsys.readouterr().out
    assert "node 3 gpu07: ranks [24, 25, 26, 27, 28, 29, 30, 31]" in out and "srun --nodes=4" in out


def test_cli_rank_execs_the_trainer_with_torch_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    task = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "16",
            "SLURM_STEP_NUM_NODES": "2", "MASTER_ADDR": "gpu01", "MASTER_PORT": "23456"}
    for key, value in task.items():
        monkeypatch.setenv(key, value)
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(slurm.os, "execvp", lambda f, a: calls.append((f, a, dict(slurm.os.environ))))
    slurm.main(["rank", "--", "python", "coin_ds/train.py"])
    [(file, args, env)] = calls
    assert (file, args) == ("python", ["python", "coin_ds/train.py"])
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("9", "1", "16", "8")


def test_cli_usage_errors() -> None:
    with pytest.raises(SystemExit):
        slurm.main(["launch"])
    with pytest.raises(SystemExit):
        slurm.main(["rank", "--"])


def test_sbatch_script_is_valid_bash_and_resumes() -> None:
    script = (REPO / "slurm" / "coin_ds.sbatch").read_text()
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "coin_ds.sbatch")], check=True)
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --open-mode=append"):
        assert line in script
    assert "--resume" in script and "scontrol requeue" in script and "-m coin_ds.slurm srun" in script
