"""SwiGLU's element-wise part, silu(gate) * up, forward and forward + backward: the routed experts'
packed [copies, 2I] GEMM output (at one GPU's EP-8 share of JoyAI: 8,192 tokens x 8 experts each) and
the dense layers' separate gate / up [tokens, intermediate]. megajoy's path (the Triton kernel on a GPU)
against the torch reference (silu, then the product: two kernels, silu(gate) kept for backward).
Memory-bound: the floor is gate and up read and the product written (backward: gate, up, dy read, both
gradients written) at copy bandwidth.

  python benchmarks/swiglu.py [--shape joyai]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_row, hot_path_args, measure_floors, report, time_op  # noqa: E402

# (rows, width, packed): experts' copies x moe_intermediate_size, then tokens x the dense intermediate size
SHAPES = {"small": [(8192, 64, True), (2048, 384, False)], "joyai": [(65536, 768, True), (8192, 7168, False)]}


def main() -> None:
    from megajoy.kernels.swiglu import swiglu, swiglu_packed, swiglu_reference

    args = hot_path_args(__doc__, "swiglu")
    floors = measure_floors(args.device, args.dtype)
    rows = []
    for m, n, packed in SHAPES[args.shape]:
        if packed:
            x = torch.randn(m, 2 * n, device=args.device, dtype=args.dtype, requires_grad=True)
            inputs, fast_fn = (x,), swiglu_packed
            base_fn = lambda t: swiglu_reference(*t.chunk(2, dim=-1))  # noqa: E731
        else:
            inputs = tuple(torch.randn(m, n, device=args.device, dtype=args.dtype, requires_grad=True) for _ in range(2))
            fast_fn, base_fn = swiglu, swiglu_reference
        dy = torch.randn(m, n, device=args.device, dtype=args.dtype)
        size = m * n * dy.element_size()  # one [m, n] operand
        label = f"{m} x {'2 x ' if packed else ''}{n} {'packed' if packed else 'gate, up'}"
        for step, fn in (("forward", lambda f: f(*inputs)),
                         ("forward + backward", lambda f: torch.autograd.grad(f(*inputs), inputs, dy))):
            fast = time_op(lambda: fn(fast_fn), args.device)
            base = time_op(lambda: fn(base_fn), args.device)
            bytes_moved = 3 * size if step == "forward" else 3 * size + 5 * size
            rows.append(bench_row(f"{label} {step}", fast, 0, bytes_moved, floors, base))
    report("swiglu", "SwiGLU: megajoy vs torch reference", rows, args, floors)


if __name__ == "__main__":
    main()
