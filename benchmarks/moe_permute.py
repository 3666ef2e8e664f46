"""MoE permute (token copies grouped by expert) and weighted unpermute (each token's K expert outputs
summed), forward and forward + backward: megajoy's path (on a GPU: index_select forward, Triton gathers
for the rest, no atomics) against the torch reference (index_select / index_add), both counting the
sort and the per-expert counts. Memory-bound: the floor reads each input once and writes
each output once (T x H in, T x K x H out for permute; the reverse for unpermute).

  python benchmarks/moe_permute.py [--shape joyai]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_row, hot_path_args, measure_floors, report, time_op  # noqa: E402

SHAPES = {"small": (4096, 128, 16, 4), "joyai": (16384, 2048, 256, 8)}  # tokens, hidden, experts, top-k


def main() -> None:
    from megajoy.kernels import moe_permute as mp
    from megajoy.kernels.backend import kernel_settings

    args = hot_path_args(__doc__, "moe_permute")
    floors = measure_floors(args.device, args.dtype)
    tokens, hidden, experts, k = SHAPES[args.shape]
    x = torch.randn(tokens, hidden, device=args.device, dtype=args.dtype, requires_grad=True)
    ids = torch.rand(tokens, experts, device=args.device).topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, device=args.device, requires_grad=True)
    _, _, source = mp.permute(x.detach(), ids, experts)
    y_perm = torch.randn(tokens * k, hidden, device=args.device, dtype=args.dtype, requires_grad=True)
    g_perm, g_out = torch.randn_like(y_perm), torch.randn_like(x)

    def reference_permute(x_):
        with kernel_settings(backend="torch"):
            return mp.permute(x_, ids, experts)[0]

    cases = {
        "permute forward": (lambda: mp.permute(x, ids, experts)[0], lambda: reference_permute(x)),
        "permute forward + backward": (
            lambda: torch.autograd.grad(mp.permute(x, ids, experts)[0], x, g_perm),
            lambda: torch.autograd.grad(reference_permute(x), x, g_perm)),
        "unpermute forward": (lambda: mp.unpermute(y_perm, source, weights),
                              lambda: mp.unpermute_reference(y_perm, source, weights)),
        "unpermute forward + backward": (
            lambda: torch.autograd.grad(mp.unpermute(y_perm, source, weights), (y_perm, weights), g_out),
            lambda: torch.autograd.grad(mp.unpermute_reference(y_perm, source, weights), (y_perm, weights), g_out)),
    }
    small, large = x.numel() * x.element_size(), y_perm.numel() * y_perm.element_size()
    moved = {"permute forward": small + large, "permute forward + backward": 2 * (small + large),
             "unpermute forward": small + large, "unpermute forward + backward": 3 * large + 2 * small}
    rows = []
    for case, (fast_fn, base_fn) in cases.items():
        fast, base = time_op(fast_fn, args.device), time_op(base_fn, args.device)
        rows.append(bench_row(f"{case} ({tokens} x {hidden}, top-{k} of {experts})", fast, 0, moved[case], floors, base))
    report("moe_permute", "MoE permute / unpermute: megajoy vs torch reference", rows, args, floors)


if __name__ == "__main__":
    main()
