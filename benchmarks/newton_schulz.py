"""Newton-Schulz for Muon, measured two ways:

1. per step: the matrices one rank orthogonalises at a layout (its TP / EP share, its pipeline stage;
   with DP > 1 a rank does ~1/DP of them), timed shape by shape, and the ratio of that time to the
   rank's training step, estimated from the model's FLOPs and the dense matmul rate measured in the same
   run;
2. tensor-parallel scheme: for a matrix split over TP ranks, Newton-Schulz on the shards with one Gram
   all-reduce per iteration against gathering the matrix, orthogonalising it whole and keeping the slice
   (forked gloo ranks on CPU).

  python benchmarks/newton_schulz.py --preset joyai-flash --pp 2 --ep 8 --dp 16
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, measure_floors, print_table, time_call, write_json  # noqa: E402


def rank_matrices(args):
    """{(batch, m, n): count} of one rank's Muon matrices (local shapes), and the rank's model."""
    from megajoy.config import OptimizerConfig, ParallelConfig, preset_model
    from megajoy.parallel.memory import rank_model
    from megajoy.parallel.muon import is_muon_matrix, matrix_layout
    from megajoy.parallel.params import parameter_specs

    cfg = preset_model(args.preset)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              expert_model_parallel_size=args.ep, data_parallel_size=args.dp)
    model, pc = rank_model(cfg, parallel, args.tp * args.pp * args.dp, 0, args.seq_length)
    specs, opt = parameter_specs(model, pc), OptimizerConfig(optimizer="muon")
    shapes: dict[tuple, int] = {}
    for name, p in model.named_parameters():
        if is_muon_matrix(name, p, opt):
            layout = matrix_layout(name, specs[name], pc, opt, cfg.num_attention_heads)
            key = (specs[name].expert, *layout.to_matrices(torch.empty(p.shape, device="meta")).shape)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes, model, cfg, pc


def per_step(args, device, dtype) -> dict:
    from megajoy.model.stats import measure, meta_model
    from megajoy.optim.muon import newton_schulz, ns_flops

    shapes, model, cfg, pc = rank_matrices(args)
    rate = measure_floors(device, dtype).matmul_flops_per_s  # the floor: Newton-Schulz is all matmuls
    repeats = (1, 3) if device.type == "cuda" else (0, 1)  # (warm-up, timed) calls per distinct shape
    rows, total = [], 0.0
    for (expert, batch, m, n), count in sorted(shapes.items()):
        x = torch.randn(batch, m, n, device=device)
        seconds = time_call(lambda: newton_schulz(x, dtype=dtype), device, *repeats)
        rows.append({"matrices": f"{'experts ' if expert else ''}{batch} x {m}x{n}", "per step": count,
                     "ms each": seconds * 1e3, "TFLOP/s": batch * ns_flops(m, n) / seconds / 1e12,
                     "x floor": seconds / (batch * ns_flops(m, n) / rate)})
        # One rank of the data-parallel group (expert-data-parallel for experts) orthogonalises each.
        total += seconds * count / pc.size("edp" if expert else "dp_cp")
    tokens = args.global_batch_size * args.seq_length / (args.dp * args.tp * args.pp)  # this rank's share
    step_seconds = measure(meta_model(cfg), args.seq_length).training_flops_per_token(True) * tokens / rate
    return {"rows": rows, "ns_seconds_per_step": total, "step_seconds_estimate": step_seconds,
            "ratio": total / step_seconds, "matmul_tflops": rate / 1e12}


def _tp_scheme_worker(rank, world, m, n, iters):
    import time

    import torch.distributed as dist

    from megajoy.launch import init_distributed, launch_env
    from megajoy.optim.muon import newton_schulz

    init_distributed(launch_env(), backend="gloo")  # forked CPU ranks, also on a machine with a GPU
    torch.manual_seed(0)
    shard = torch.randn(1, m // world, n)
    group = dist.group.WORLD

    def gram():
        return newton_schulz(shard, sharded="rows", group=group)

    def gather():
        from megajoy.parallel.mappings import _all_gather

        return newton_schulz(_all_gather(shard, group, dim=1)).chunk(world, dim=1)[rank]

    times = {}
    for name, fn in (("Gram all-reduce on shards", gram), ("gather, orthogonalise whole, slice", gather)):
        fn()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        dist.barrier()
        times[name] = (time.perf_counter() - start) / iters
    return times


def tp_scheme(args) -> list[dict]:
    from megajoy.parallel.spawn import run_workers

    rows = []
    for m, n in ((1536, 384), (3072, 768)):  # a column-parallel shard's shape family (rows split), scaled down
        times = run_workers(args.tp_ranks, _tp_scheme_worker, m, n, 3)[0]
        w, small = args.tp_ranks, min(m, n)
        # Bytes each rank sends in ring collectives: 5 Gram all-reduces of small x small, or one all-gather.
        traffic = {"Gram all-reduce on shards": 5 * 2 * (w - 1) / w * small * small * 4,
                   "gather, orthogonalise whole, slice": (w - 1) / w * m * n * 4}
        for name, seconds in times.items():
            rows.append({"matrix": f"{m}x{n} over {args.tp_ranks} ranks", "scheme": name, "ms": seconds * 1e3,
                         "MB exchanged": traffic[name] / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="joyai-flash")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--dp", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--global-batch-size", type=int, default=9216)
    parser.add_argument("--tp-ranks", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/newton_schulz.json")
    args = parser.parse_args()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = per_step(args, device, dtype)
    print(f"Newton-Schulz per step, {args.preset}, rank 0 of TP {args.tp} x PP {args.pp} x EP {args.ep} x DP "
          f"{args.dp}, {device}, {dtype}:")
    print_table(result["rows"], ["matrices", "per step", "ms each", "TFLOP/s", "x floor"])
    print(f"  Newton-Schulz per rank and step: {result['ns_seconds_per_step']:.3f} s; estimated step "
          f"{result['step_seconds_estimate']:.2f} s (at the measured {result['matmul_tflops']:.2f} TFLOP/s); "
          f"ratio {result['ratio']:.1%}")
    scheme = tp_scheme(args)
    print("tensor-parallel Newton-Schulz (CPU, gloo):")
    print_table(scheme, ["matrix", "scheme", "ms", "MB exchanged"])
    write_json(args.out, {"benchmark": "newton_schulz", "env": environment(device), "per_step": result,
                          "tp_scheme": scheme})


if __name__ == "__main__":
    main()
