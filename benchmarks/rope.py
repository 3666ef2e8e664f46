"""Rotary embedding of MLA's queries (the 64-wide rope slice of each 192-wide head, a strided view) and
of the shared key, forward and forward + backward: megajoy's path (the Triton kernel on a GPU) against
the torch reference. Memory-bound: the floor is the rope slice read and the rotated output written.

  python benchmarks/rope.py [--shape joyai]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_row, hot_path_args, measure_floors, report, time_op  # noqa: E402

SHAPES = {"small": (4, 512, 4, 32, 16), "joyai": (4, 4096, 32, 128, 64)}  # batch, seq, heads, nope, rope


def main() -> None:
    from megajoy.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin, rope_frequencies

    args = hot_path_args(__doc__, "rope")
    floors = measure_floors(args.device, args.dtype)
    b, s, h, nope, r = SHAPES[args.shape]
    inv_freq, amplitude = rope_frequencies(r, 1e4, None)
    positions = torch.arange(s, device=args.device).expand(b, s)
    cos, sin = rope_cos_sin(positions, inv_freq, amplitude)
    q = torch.randn(b, s, h, nope + r, device=args.device, dtype=args.dtype)
    k = torch.randn(b, s, 1, r, device=args.device, dtype=args.dtype)
    rows = []
    # The gradient is taken for the rope slice itself: for the whole of q, autograd would also write the
    # zeros of its nope part, bytes that neither the floor nor a training step's backward holds.
    for name, x in (("queries", q[..., nope:].requires_grad_()), ("shared key", k.requires_grad_())):
        x_bytes = x.numel() * x.element_size()
        cos_sin_bytes = 2 * cos.numel() * 4
        dy = torch.randn(x.shape, device=args.device, dtype=args.dtype)
        for label, fn in (("forward", lambda f: f(x, cos, sin)),
                          ("forward + backward", lambda f: torch.autograd.grad(f(x, cos, sin), x, dy))):
            fast = time_op(lambda: fn(apply_rope), args.device)
            base = time_op(lambda: fn(apply_rope_reference), args.device)
            # x read, y written (backward: dy read, dx written); cos and sin read once
            moved = (2 if label == "forward" else 4) * x_bytes + cos_sin_bytes
            rows.append(bench_row(f"{name} [{b}, {s}, {x.shape[2]}, {r}] {label}", fast, 0, moved, floors, base))
    report("rope", "RoPE: megajoy vs torch reference", rows, args, floors)


if __name__ == "__main__":
    main()
