"""The launch environment: torchrun's variables, or SLURM's when `srun` starts the processes directly.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under `srun` with no wrapper,
SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID give the ranks and the master is the first host of the
step's SLURM_STEP_NODELIST (e.g. `gpu[01-04,07]` -> `gpu01`); the port is MASTER_PORT or one derived from the
job and step ids, so that steps running side by side on one node do not meet on one port.

A batch script (or an salloc shell) that runs megajoy itself, without srun, also sees SLURM_PROCID=0 and the
job's SLURM_NTASKS, but none of the SLURM_STEP_* variables srun sets for the processes of a step: that process
runs alone, with a note, rather than wait for ranks no one starts.
"""

import os
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (hostlist expressions prefix[ranges]suffix, brackets repeatable):
    'a[3-5,9],b1' -> 'a3', 'gpu[007-008]' -> 'gpu007', 'node[1-2]-ib' -> 'node1-ib', 'r[1-2]-n[01-04]' -> 'r1-n01'."""
    nodelist = nodelist.strip()
    expression = re.match(r"(?:[^,\[\]\s]*\[[^\]]+\])*[^,\[\]\s]*", nodelist).group(0)
    if not expression:
        raise ValueError(f"SLURM_NODELIST={nodelist!r}: cannot read a host name from it")
    return re.sub(r"\[([^\]]+)\]", lambda ranges: re.split(r"[,-]", ranges.group(1))[0], expression)


def launch_env(environ: dict | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return _srun_env(env)
    if int(env.get("SLURM_NTASKS", 1)) > 1:
        print(f"megajoy: SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun (no "
              f"SLURM_STEP_NUM_TASKS): running as a single process; launch with `srun` for one process per task",
              file=sys.stderr)
    return LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "single")


def _srun_env(env) -> LaunchEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist is None and "MASTER_ADDR" not in env:
        raise ValueError("SLURM_PROCID is set but neither SLURM_STEP_NODELIST, SLURM_NODELIST nor MASTER_ADDR: "
                         "cannot find the master")
    addr = env.get("MASTER_ADDR") or first_host(nodelist)
    return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                     addr, int(env.get("MASTER_PORT") or slurm_port(env)), "slurm")


def slurm_port(env) -> int:
    """20000-39999 from the job and step ids: ten steps of a job get ten ports, the next job's the next ten."""
    job, step = int(env.get("SLURM_JOB_ID", 0)), int(env.get("SLURM_STEP_ID", 0))
    return 20000 + (10 * job + step % 10) % 20000


def init_distributed(env: LaunchEnv, backend: str | None = None) -> None:
    """Start torch.distributed for a multi-process launch (NCCL with GPUs, gloo otherwise)."""
    import torch
    import torch.distributed as dist

    if env.world_size == 1 or dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size)


def setup_parallel(job):
    """Start torch.distributed when launched with several processes and build this rank's context."""
    import torch

    from megajoy.parallel.context import build_context

    env = launch_env()
    init_distributed(env)
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return build_context(job.parallel, env.rank, env.world_size, device, job.model, job.data.seq_length)
