"""Run a function in forked worker processes (start-up ~0.1 s each) with the environment torchrun or srun
would give them: for tests and CPU benchmarks of multi-rank code on gloo."""

import io
import multiprocessing
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def slurm_env(rank: int, world: int, port: int, tasks_per_node: int = 4) -> dict:
    """What srun gives the processes of a step (the master host from the step's node list)."""
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_STEP_NUM_TASKS": str(world),
            "SLURM_LOCALID": str(rank % tasks_per_node), "SLURM_NODELIST": "node[1-2]",
            "SLURM_STEP_NODELIST": "127.0.0.[1-2]", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
            "MASTER_PORT": str(port)}


def _entry(fn, rank, world, env, args, queue):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS"):
        os.environ.pop(key, None)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        # As bytes: torch would pass tensors through shared memory, whose file descriptors vanish when
        # this process exits before the parent has read them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, including SystemExit from a CLI
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(world: int, fn, *args, env_fn=torchrun_env, timeout: float = 600) -> list:
    """fn(rank, world, *args) in `world` forked processes; returns the results in rank order."""
    import torch

    ctx = multiprocessing.get_context("fork")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, env_fn(r, world, port), args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status != "ok":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("worker failed: " + errors[0])
    return [results[r] for r in range(world)]


def cli_worker(rank: int, world: int, argv: list[str]) -> int:
    """A rank of `megajoy ARGV` (what torchrun / srun would start)."""
    from megajoy.cli import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"megajoy exited with {code}")
    return code
