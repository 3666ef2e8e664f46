"""MoE dispatch path, phase by phase: permute, all-to-all out, grouped GEMM over local experts,
all-to-all back, weighted un-permute; beside it, in the same run, the per-expert loop that the grouped
GEMM replaces. Each phase is held against its floor (GEMM FLOPs at the dense matmul rate, bytes at the
copy bandwidth, both measured in the same run). On one rank it also times the whole MoE layer (router,
dispatch, experts, shared expert, combine) forward + backward under bf16 autocast on a GPU, as training
runs it (fp32 weights; on a GPU also bf16 weights over fp32 masters, `--params-dtype bf16`), and
reports its rate against the dense matmul rate.

  python benchmarks/moe_dispatch.py                 # CPU, 1 rank (no all-to-all)
  python benchmarks/moe_dispatch.py --ep 4          # CPU, 4 forked ranks on gloo
  torchrun --nproc-per-node 8 benchmarks/moe_dispatch.py --shape joyai   # GPUs, NCCL, EP over all ranks
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (environment, measure_floors, print_profile, print_table, time_call,  # noqa: E402
                               time_op, write_json)

SHAPES = {  # tokens per rank, hidden, expert intermediate, experts, top-k
    "small": (4096, 256, 128, 16, 4),
    "joyai": (8192, 2048, 768, 256, 8),
    # One GPU's share under EP 8: 32 local experts receive ~8 x 8192 token copies (2,048 rows each).
    "joyai-ep8": (8192, 2048, 768, 32, 8),
}


def phases(tokens, hidden, inter, experts, topk, device, group):
    from megajoy.kernels.grouped_gemm import grouped_mm
    from megajoy.kernels.moe_permute import permute, unpermute
    from megajoy.parallel.expert_parallel import all_to_all, source_to_expert_order

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ranks = dist.get_world_size(group) if group is not None else 1
    local = experts // ranks
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    ids = torch.randint(0, experts, (tokens, topk), device=device)
    weights = torch.rand(tokens, topk, device=device)
    w1 = torch.randn(local, 2 * inter, hidden, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(local, hidden, inter, device=device, dtype=dtype) * 0.02
    state = {}

    def do_permute():
        state["perm"], state["counts"], state["source"] = permute(x, ids, experts)

    def do_dispatch():
        send = state["counts"].view(ranks, local)
        recv = torch.empty_like(send)
        if group is not None:
            dist.all_to_all_single(recv, send.contiguous(), group=group)
        else:
            recv = send
        state["send"], state["recv"] = send.sum(1).tolist(), recv.sum(1).tolist()
        arrived = all_to_all(state["perm"], state["recv"], state["send"], group) if group is not None else state["perm"]
        state["order"] = source_to_expert_order(recv)
        state["local"], state["local_counts"] = arrived.index_select(0, state["order"]), recv.sum(0)

    def experts_fn(x_local):
        gate, up = grouped_mm(x_local, w1.transpose(1, 2), state["local_counts"]).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), state["local_counts"])

    def do_gemm():
        state["y"] = experts_fn(state["local"])

    def do_loop_baseline():
        out, start = [], 0
        for e, n in enumerate(state["local_counts"].tolist()):
            rows = state["local"][start:start + n]
            gate, up = F.linear(rows, w1[e]).chunk(2, dim=-1)
            out.append(F.linear(F.silu(gate) * up, w2[e]))
            start += n
        return torch.cat(out)

    def do_combine_a2a():
        y_recv = torch.empty_like(state["y"]).index_copy(0, state["order"], state["y"])
        state["y_perm"] = all_to_all(y_recv, state["send"], state["recv"], group) if group is not None else y_recv

    def do_unpermute():
        unpermute(state["y_perm"], state["source"], weights)

    return [("permute", do_permute), ("all-to-all dispatch", do_dispatch), ("grouped GEMM", do_gemm),
            ("all-to-all combine", do_combine_a2a), ("unpermute", do_unpermute),
            ("baseline: per-expert loop GEMM", do_loop_baseline)], state


def run(rank, world, args):
    group = None
    if world > 1:
        from megajoy.launch import init_distributed, launch_env

        init_distributed(launch_env())
        group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tokens, hidden, inter, experts, topk = SHAPES[args.shape]
    torch.manual_seed(rank)
    steps, state = phases(tokens, hidden, inter, experts, topk, device, group)
    floors = measure_floors(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    element = 2 if device.type == "cuda" else 4
    rows = []
    for name, fn in steps:  # phases depend on each other's outputs: run in order, time each
        seconds = time_call(fn, device, warmup=1, iters=args.iters)
        rows_moved = int(state["local_counts"].sum()) if "GEMM" in name else tokens * topk
        flops = 2 * 3 * hidden * inter * rows_moved if "GEMM" in name else 0
        # permute / unpermute: T rows one way, T*K the other; the local reorderings read and write T*K rows
        moved = 0 if flops else (rows_moved + (tokens if "permute" in name else rows_moved)) * hidden * element
        rows.append({"phase": name, "ms": seconds * 1e3, "TFLOP/s": flops / seconds / 1e12 if flops else None,
                     "x floor": seconds / floors.seconds(flops, moved)})
    if group is None:
        rows.append(moe_layer_row(tokens, hidden, inter, experts, topk, device, floors, args.profile))
        if device.type == "cuda":  # bf16 is ~30x slower on a CPU without bf16 units
            rows.append(moe_layer_row(tokens, hidden, inter, experts, topk, device, floors, args.profile,
                                      bf16_weights=True))
    return rows, environment(device) | {"matmul_tflops": floors.matmul_flops_per_s / 1e12}


def moe_layer_row(tokens, hidden, inter, experts, topk, device, floors, profile: bool,
                  bf16_weights: bool = False) -> dict:
    """megajoy's MoE block, forward + backward (one shared expert beside the routed ones). Default: fp32
    weights under bf16 autocast (on a GPU). `bf16_weights`: as `--params-dtype bf16` trains, bf16 weights
    and a bf16 residual stream, each weight gradient added into its fp32 master's gradient."""
    from megajoy.config import ModelConfig
    from megajoy.model.moe import MoE
    from megajoy.optim.master_weights import MasterWeights

    cfg = ModelConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                      num_experts_per_tok=topk, vocab_size=256, num_hidden_layers=2)
    layer = MoE(cfg).to(device).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    if bf16_weights:
        MasterWeights(layer)
        x, dy = x.detach().bfloat16().requires_grad_(), dy.bfloat16()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = layer(x)
        if bf16_weights:
            y.backward(dy)  # the hooks add each weight's gradient into its master's
        else:
            torch.autograd.grad(y, [x] + list(layer.parameters()), dy)

    seconds = time_op(step, device)
    if profile:
        print_profile(step, device)
    flops = 3 * 2 * tokens * (hidden * experts + 3 * hidden * inter * (topk + 1))  # router + routed + shared
    label = "whole MoE layer, forward + backward" + (", bf16 weights over fp32 masters" if bf16_weights else "")
    return {"phase": label, "ms": seconds * 1e3,
            "TFLOP/s": flops / seconds / 1e12, "x floor": seconds / floors.seconds(flops, 0),
            "of matmul rate": floors.seconds(flops, 0) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--ep", type=int, default=1, help="ranks to fork on CPU (ignored under torchrun)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="print the MoE layer's most expensive ops")
    parser.add_argument("--out", default="benchmarks/results/moe_dispatch.json")
    args = parser.parse_args()
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rows, env = run(rank, world, args)
    elif args.ep > 1:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from megajoy.parallel.spawn import run_workers

        rank, results = 0, run_workers(args.ep, run, args)
        rows, env = results[0]
        world = args.ep
    else:
        rank, world = 0, 1
        rows, env = run(0, 1, args)
    if rank == 0:
        tokens, hidden, inter, experts, topk = SHAPES[args.shape]
        print(f"MoE dispatch, {args.shape}: {tokens} tokens/rank, hidden {hidden}, expert inter {inter}, "
              f"{experts} experts, top-{topk}, {world} rank(s), {env['device']}")
        print(f"  dense matmul rate measured in this run: {env['matmul_tflops']:.3g} TFLOP/s")
        print_table(rows, ["phase", "ms", "TFLOP/s", "x floor", "of matmul rate"])
        write_json(args.out, {"benchmark": "moe_dispatch", "shape": args.shape, "ranks": world, "env": env,
                              "phases": rows})


if __name__ == "__main__":
    main()
