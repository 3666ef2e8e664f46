"""The MoE router (fp32 sigmoid scores, top-k on score + bias, optional group-limited selection, weights
normalised and scaled) forward and forward + backward: megajoy's Router (on a GPU its element-wise part
is one Triton kernel each way), beside it the same router on the torch reference and under torch.compile,
and as the baseline Hugging Face transformers' DeepseekV3 router with the same weights (same choices
checked). The floor: the score GEMM at the matmul rate or x and the weight read in fp32 at copy
bandwidth, whichever is longer.

  python benchmarks/router.py [--shape joyai]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_row, hot_path_args, measure_floors, report, time_op  # noqa: E402

SHAPES = {"small": (4096, 128, 16, 4), "joyai": (16384, 2048, 256, 8)}  # tokens, hidden, experts, top-k


def hf_router(cfg, weight, bias):
    """transformers' router as a function of hidden states -> (weights, ids), and the router's weight."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    hf_cfg = DeepseekV3Config(hidden_size=cfg.hidden_size, n_routed_experts=cfg.n_routed_experts,
                              num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
                              topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                              routed_scaling_factor=cfg.routed_scaling_factor,
                              moe_intermediate_size=cfg.moe_intermediate_size)
    router = hf.DeepseekV3TopkRouter(hf_cfg).to(weight.device)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.e_score_correction_bias.copy_(bias)
    moe = None

    def route(x):
        nonlocal moe
        out = router(x)
        if isinstance(out, tuple):  # transformers >= 5.2x: the router selects too
            _, weights, ids = out
            return weights, ids
        if moe is None:  # earlier 5.x: the MoE block selects from the router's logits
            moe = hf.DeepseekV3MoE(hf_cfg).to(weight.device)
            moe.gate = router
        ids, weights = moe.route_tokens_to_experts(out)
        return weights, ids

    return route, router.weight


def forward_backward(route_weights, x: torch.Tensor, weight: torch.Tensor):
    """A training step's share of the router: forward, then the gradients of the input and the weight (asked
    for both: autograd leaves out a gradient no one asks for, which one path's GEMM would and another's not)."""
    return torch.autograd.grad(route_weights(x).square().sum(), (x, weight))


def main() -> None:
    from megajoy.config import ModelConfig
    from megajoy.kernels.backend import kernel_settings
    from megajoy.model.moe import Router

    args = hot_path_args(__doc__, "router")
    floors = measure_floors(args.device, torch.float32)  # the router computes in fp32
    tokens, hidden, experts, k = SHAPES[args.shape]
    cfg = ModelConfig(hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=k, vocab_size=256,
                      num_hidden_layers=2)
    router = Router(cfg).to(args.device).train()
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
        router.e_score_correction_bias.normal_(0, 0.01)
    baseline, baseline_weight = hf_router(cfg, router.weight.detach(), router.e_score_correction_bias)
    compiled = torch.compile(router)
    x = torch.randn(tokens, hidden, device=args.device, dtype=args.dtype, requires_grad=True)
    ours, theirs = router(x), baseline(x)
    same = torch.equal(ours.expert_ids_TK.sort(-1).values, theirs[1].sort(-1).values)
    flops = 2 * tokens * hidden * experts
    moved = tokens * hidden * (x.element_size() + 4) + experts * hidden * 4 + tokens * k * 12

    rows = []
    for label, factor in (("forward", 1), ("forward + backward", 3)):  # backward: the x and weight gradients
        def run(route_weights, weight, factor=factor):
            return route_weights(x) if factor == 1 else forward_backward(route_weights, x, weight)

        base = time_op(lambda: run(lambda t: baseline(t)[0], baseline_weight), args.device)
        for name, module, kernels in (("megajoy", router, "auto"), ("megajoy torch reference", router, "torch"),
                                      ("megajoy compiled", compiled, "auto")):
            with kernel_settings(backend=kernels):
                seconds = time_op(lambda: run(lambda t: module(t).weights_TK, router.weight), args.device)
            rows.append(bench_row(f"{name} {label} ({tokens} x {hidden}, top-{k} of {experts})", seconds,
                                  factor * flops, factor * moved, floors, base))
    report("router", f"Router: megajoy vs transformers DeepseekV3 (same experts chosen: {same})", rows, args,
           floors, same_choices=same)


if __name__ == "__main__":
    main()
