"""SLURM launch: one task per rank, started by srun, rendezvous through env:// variables.

`slurm/coin_ds.sbatch` runs, inside the allocation,

    python -m coin_ds.slurm srun -- python coin_ds/train.py <args>

which reads SLURM's variables, works out the rendezvous (first host of the nodelist, a port from the job id, ranks per
node from the GPUs per node) and replaces itself with

    srun --nodes=N --ntasks=N*G --ntasks-per-node=G ... python -m coin_ds.slurm rank -- python coin_ds/train.py <args>

Every task then replaces itself with the trainer, after setting RANK, LOCAL_RANK, WORLD_SIZE, ... from SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS. Both steps use exec, so a signal sent to srun (or by `scancel --signal`) reaches the
trainer ranks and not a wrapper. Everything below except `hostnames` and `main` is pure and unit-tested.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PORT_BASE = 20000  # MASTER_PORT = PORT_BASE + job_id % PORT_SPAN, unless MASTER_PORT is set
PORT_SPAN = 20000


def _split_outside_brackets(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in nodelist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in nodelist {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range(spec: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; numbers keep the zero padding of the range's start."""
    out: list[str] = []
    for item in spec.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in [{spec}]")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in [{spec}]")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str) -> list[str]:
    """One comma-free host pattern, any number of [...] groups: 'r[1-2]-n[01-02]' -> r1-n01, r1-n02, r2-n01, r2-n02."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + value + rest for value in _expand_range(match.group(1)) for rest in _expand_host(tail)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Pure-Python `scontrol show hostnames`: 'gpu[01-03,07],cpu1' -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    hosts: list[str] = []
    for pattern in _split_outside_brackets(nodelist):
        hosts.extend(_expand_host(pattern))
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """SLURM's own expansion (`scontrol show hostnames`) when it works here, the pure-Python one otherwise."""
    if shutil.which("scontrol") is not None:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def _count(value: str | None) -> int | None:
    """SLURM counts: '8', 'a100:8', '8(x4)' -> 8; None or '' -> None."""
    if not value:
        return None
    match = re.match(r"^(?:[^:,(]*:)?(\d+)", value)
    if match is None:
        raise ValueError(f"cannot read a count from {value!r}")
    return int(match.group(1))


def master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port derived from the job id (stable across requeues, spread across jobs)."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN


@dataclass(frozen=True)
class Rendezvous:
    hosts: tuple[str, ...]
    master_addr: str
    master_port: int
    ranks_per_node: int  # one rank per GPU; on CPU-only allocations, one per task
    gpus_per_node: int  # 0 on CPU-only allocations
    cpus_per_task: int | None

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.ranks_per_node

    def node_rank(self, host: str) -> int:
        return self.hosts.index(host)

    def ranks_of(self, host: str) -> list[int]:
        first = self.node_rank(host) * self.ranks_per_node
        return list(range(first, first + self.ranks_per_node))


def rendezvous_from_env(env: Mapping[str, str], hosts: Sequence[str] | None = None) -> Rendezvous:
    """The rendezvous of a batch job from its environment (SLURM_JOB_NODELIST, SLURM_JOB_ID, GPU/task counts).

    Ranks per node: the GPUs per node when the job has GPUs (--gpus-per-node, --gres=gpu:N), else
    --ntasks-per-node, else 1. `hosts` skips the nodelist expansion (tests pass it; the launcher calls scontrol).
    """
    if hosts is None:
        hosts = hostnames(env["SLURM_JOB_NODELIST"])
    if not hosts:
        raise ValueError("empty SLURM_JOB_NODELIST")
    nnodes = _count(env.get("SLURM_JOB_NUM_NODES")) or len(hosts)
    if nnodes != len(hosts):
        raise ValueError(f"SLURM_JOB_NUM_NODES={nnodes} but the nodelist has {len(hosts)} hosts: {list(hosts)}")
    gpus = _count(env.get("SLURM_GPUS_PER_NODE")) or _count(env.get("SLURM_GPUS_ON_NODE")) or 0
    ranks = gpus or _count(env.get("SLURM_NTASKS_PER_NODE")) or 1
    return Rendezvous(
        hosts=tuple(hosts),
        master_addr=env.get("MASTER_ADDR") or hosts[0],
        master_port=master_port(env),
        ranks_per_node=ranks,
        gpus_per_node=gpus,
        cpus_per_task=_count(env.get("SLURM_CPUS_PER_TASK")),
    )


def srun_command(rdv: Rendezvous, command: Sequence[str], python: str = "python") -> list[str]:
    """The one srun line that starts every rank of the job: each task runs `coin_ds.slurm rank -- <command>`."""
    cmd = [
        "srun",
        f"--nodes={rdv.nnodes}",
        f"--ntasks={rdv.world_size}",
        f"--ntasks-per-node={rdv.ranks_per_node}",
    ]
    if rdv.cpus_per_task:
        cmd.append(f"--cpus-per-task={rdv.cpus_per_task}")  # srun >= 22.05 no longer inherits it from sbatch
    if rdv.gpus_per_node:
        cmd.append(f"--gpus-per-node={rdv.gpus_per_node}")  # every rank sees its node's GPUs; LOCAL_RANK picks one
    cmd += ["--kill-on-bad-exit=1", "--label", python, "-m", "coin_ds.slurm", "rank", "--", *command]
    return cmd


def launch_env(rdv: Rendezvous) -> dict[str, str]:
    """Variables the batch step exports to srun (and srun to every task)."""
    return {
        "MASTER_ADDR": rdv.master_addr,
        "MASTER_PORT": str(rdv.master_port),
        "NNODES": str(rdv.nnodes),
        "GPUS_PER_NODE": str(rdv.gpus_per_node),
        "WORLD_SIZE": str(rdv.world_size),
    }


def rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """Inside one srun task: torch's env:// variables from SLURM's task variables."""
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key):
            raise KeyError(f"{key} is not set: run this under `srun` from `python -m coin_ds.slurm srun`")
    world = int(env["SLURM_NTASKS"])
    nnodes = _count(env.get("SLURM_STEP_NUM_NODES")) or _count(env.get("SLURM_NNODES")) or 1
    out = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world // nnodes),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": env["MASTER_ADDR"],
        "MASTER_PORT": env["MASTER_PORT"],
    }
    if not env.get("OMP_NUM_THREADS"):
        out["OMP_NUM_THREADS"] = env.get("SLURM_CPUS_PER_TASK") or "1"
    return out


def describe(rdv: Rendezvous) -> str:
    lines = [f"{k}={v}" for k, v in launch_env(rdv).items()]
    lines += [f"node {i} {host}: ranks {rdv.ranks_of(host)}" for i, host in enumerate(rdv.hosts)]
    return "\n".join(lines)


def _after_dashes(argv: list[str]) -> list[str]:
    if "--" not in argv:
        raise SystemExit("usage: python -m coin_ds.slurm {plan|srun|rank} [--dry-run] -- <command ...>")
    command = argv[argv.index("--") + 1 :]
    if not command:
        raise SystemExit("missing the command after --")
    return command


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv else ""
    if what == "plan":
        print(describe(rendezvous_from_env(os.environ)))
    elif what == "srun":
        rdv = rendezvous_from_env(os.environ)
        cmd = srun_command(rdv, _after_dashes(argv), python=sys.executable)
        print(describe(rdv), "\n" + shlex.join(cmd), flush=True)
        if "--dry-run" in argv[: argv.index("--")]:
            return
        os.environ.update(launch_env(rdv))
        os.execvp(cmd[0], cmd)  # exec: the batch script's $! is srun itself, so its signals reach srun
    elif what == "rank":
        command = _after_dashes(argv)
        os.environ.update(rank_env(os.environ))
        os.execvp(command[0], command)
    else:
        raise SystemExit("usage: python -m coin_ds.slurm {plan|srun|rank} [--dry-run] -- <command ...>")


if __name__ == "__main__":
    main()
