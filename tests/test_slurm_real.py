"""The batch script under a real one-node SLURM on localhost (munged + slurmctld + slurmd started here).

The session fixture installs Debian's slurm-wlm and munge when they are missing (skipping, with the reason, only when
that is impossible), writes a private slurm.conf and munge key in a temporary folder, uses loopback and free ports,
and always stops the daemons it started. The jobs run the real trainer on its embedded default with 2 CPU ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coin_ds import slurm

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Two CPU ranks on one node, no GPUs: everything else comes from the #SBATCH lines of the project's script.
CPU_JOB = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]


def _install() -> str | None:
    """Install slurm-wlm and munge if missing; the reason they are unavailable, or None."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM is not installed and cannot be (needs root and apt-get); missing {[b for b in BINARIES if not shutil.which(b)]}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = "apt-get update -qq && apt-get install -y -qq slurm-wlm munge"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=900)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if proc.returncode != 0 or missing:
        return f"`{cmd}` failed (rc {proc.returncode}, missing {missing}): {(proc.stdout + proc.stderr)[-600:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # SLURM_CONF etc. for the client commands and the jobs

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        fields: dict[str, str] = {}
        for token in self.run("scontrol", "show", "job", "-o", job_id).split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout}s:\n{self.logs()}")

    def sbatch(self, out_dir: Path, *train_args: str) -> str:
        env = {**self.env, "OUTPUT_DIR": str(out_dir), "VENV": str(VENV)}
        proc = subprocess.run(
            ["sbatch", "--parsable", *CPU_JOB, f"--output={self.root}/jobs/%x-%j.out", "slurm/coin_ds.sbatch", *train_args],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def log(self, job_id: str) -> str:
        return (self.root / "jobs" / f"coin_ds-{job_id}.out").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*/*.log")))


def _write_conf(root: Path, host: str) -> Path:
    for sub in ("state", "spool", "log", "munge", "jobs"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=coinds
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2
ReturnToService=2
MpiDefault=none
KillWait=10
NodeName={host} NodeHostname={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _install()
    if reason:
        print(f"\nSKIP real SLURM tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = _write_conf(root, host)
    env = {**os.environ, "SLURM_CONF": str(conf), "HF_HUB_OFFLINE": "1"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    try:
        socket.gethostbyname(host)  # the launcher's MASTER_ADDR is the first host of the nodelist
    except OSError:
        env["MASTER_ADDR"] = "127.0.0.1"
    m = root / "munge"
    daemons: list[subprocess.Popen] = []
    cl = Cluster(root, env)
    try:
        for cmd in (
            ["munged", "-F", "--force", f"--socket={m}/munge.sock", f"--key-file={m}/munge.key",
             f"--log-file={root}/log/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"],
            ["slurmctld", "-D"],
            ["slurmd", "-D"],
        ):
            daemons.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        deadline = time.time() + 60
        while cl.run("sinfo", "-h", "-o", "%t", check=False).strip() != "idle":
            if time.time() > deadline or any(d.poll() is not None for d in daemons):
                raise AssertionError(f"SLURM did not come up: {cl.run('sinfo', check=False)}\n{cl.logs()}")
            time.sleep(0.5)
        yield cl
    finally:
        if len(daemons) == 3 and daemons[1].poll() is None:  # cancel leftovers so no slurmstepd outlives the test
            cl.run("scancel", "--full", "--user=root", check=False)
            deadline = time.time() + 30
            while cl.run("squeue", "-h", check=False).strip() and time.time() < deadline:
                time.sleep(0.5)
        for proc in reversed(daemons):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _steps(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_scontrol_and_python_expand_nodelists_alike(cluster: Cluster) -> None:
    for nodelist in ("gpu[01-03,07]", "n[008-010],m1", "n[8-10]", "n[098-101]", "n[007-9]", "rack[1-2]-n[01-02]", "a-b,c"):
        assert cluster.run("scontrol", "show", "hostnames", nodelist).split() == slurm.expand_nodelist(nodelist)


def test_batch_job_trains_and_checkpoints(cluster: Cluster) -> None:
    out_dir = cluster.root / "run_plain"
    t0 = time.time()
    job = cluster.sbatch(out_dir, "train.max_steps=4", "train.save_every=2")
    info = cluster.wait(job)
    log = cluster.log(job)
    print(f"\nplain job {job}: {info['JobState']} in {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "WORLD_SIZE=2" in log and "srun --nodes=1 --ntasks=2 --ntasks-per-node=2" in log
    assert "0: " in log and "1: " in log  # both ranks ran (srun --label)
    assert (out_dir / "checkpoints" / "latest").read_text().strip() in {p.name for p in (out_dir / "checkpoints").iterdir()}
    assert len([p for p in (out_dir / "checkpoints").iterdir() if p.is_dir()]) >= 2  # step 2 and the final step 4
    assert _steps(out_dir) == [1, 2, 3, 4]
    assert json.loads((out_dir / "summary.json").read_text())["steps"] == 4


def test_preempted_job_checkpoints_requeues_and_resumes(cluster: Cluster) -> None:
    out_dir = cluster.root / "run_preempt"
    total = 20
    t0 = time.time()
    job = cluster.sbatch(out_dir, f"train.max_steps={total}", "train.save_every=0")
    metrics = out_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # training is under way
        assert cluster.job(job)["JobState"] in {"PENDING", "RUNNING"}, cluster.log(job)
        assert time.time() - t0 < 180, "training did not start"
        time.sleep(0.2)
    # What --signal=B:USR1@120 does before the time limit: USR1 to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    t_signal = time.time() - t0
    preempted = out_dir / "preempted.json"
    while not preempted.exists():  # written by the ranks, removed when the requeued job starts
        assert time.time() - t0 < 180, f"no preempted.json:\n{cluster.log(job)}"
        time.sleep(0.1)
    saved = json.loads(preempted.read_text())["step"]
    t_saved = time.time() - t0
    tag = (out_dir / "checkpoints" / "latest").read_text().strip()
    assert any((out_dir / "checkpoints" / tag).iterdir()), f"empty checkpoint {tag}"

    info = cluster.wait(job)
    log = cluster.log(job)
    print(f"\npreempted job {job}: signal at {t_signal:.1f}s, checkpoint of step {saved} at {t_saved:.1f}s, "
          f"{info['JobState']} after {info['Restarts']} restart(s) at {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    assert 2 <= saved < total
    assert "requeueing job" in log and f"job {job} restart 1" in log
    assert "[resume] from" in log
    # The resumed run continued after the saved step: every step once, in order, none restarted at 1.
    assert _steps(out_dir) == list(range(1, total + 1)), log
    assert json.loads((out_dir / "summary.json").read_text())["steps"] == total
    assert not preempted.exists()
