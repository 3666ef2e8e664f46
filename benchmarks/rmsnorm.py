"""RMSNorm forward and forward + backward at the widths JoyAI normalises (hidden, q latent, kv latent):
megajoy's path (the Triton kernel on a GPU) against the torch reference (eager, several kernels).
Memory-bound: the floor is x read and y written (backward: x, dy read, dx written) at copy bandwidth.

  python benchmarks/rmsnorm.py [--shape joyai]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_row, hot_path_args, measure_floors, report, time_op  # noqa: E402

SHAPES = {"small": (4096, [128, 96, 64]), "joyai": (16384, [2048, 1536, 512])}  # tokens, widths


def main() -> None:
    from megajoy.kernels.rmsnorm import rms_norm, rms_norm_reference

    args = hot_path_args(__doc__, "rmsnorm")
    floors = measure_floors(args.device, args.dtype)
    tokens, widths = SHAPES[args.shape]
    rows = []
    for width in widths:
        x = torch.randn(tokens, width, device=args.device, dtype=args.dtype, requires_grad=True)
        w = torch.ones(width, device=args.device, dtype=args.dtype, requires_grad=True)
        dy = torch.randn_like(x)
        size = x.numel() * x.element_size()
        for label, fn in (("forward", lambda f: f(x, w, 1e-6)),
                          ("forward + backward", lambda f: torch.autograd.grad(f(x, w, 1e-6), (x, w), dy))):
            fast = time_op(lambda: fn(rms_norm), args.device)
            base = time_op(lambda: fn(rms_norm_reference), args.device)
            bytes_moved = 2 * size if label == "forward" else 5 * size
            rows.append(bench_row(f"{tokens} x {width} {label}", fast, 0, bytes_moved, floors, base))
    report("rmsnorm", "RMSNorm: megajoy vs torch reference", rows, args, floors)


if __name__ == "__main__":
    main()
