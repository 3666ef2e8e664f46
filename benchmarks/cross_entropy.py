"""The output projection and cross-entropy, forward + backward, over JoyAI's 129,280-token vocabulary:
megajoy's fused, chunked head + loss (the full logits never held) against the reference (logits from one
GEMM, then the cross-entropy megajoy uses for vocabulary-parallel logits, on one rank). Reports time,
peak memory above the inputs, and the floor: 3 GEMMs of N x V x K (forward, dh, dW) at the matmul rate.
The chunked path does a fourth (the recomputation); its ratio to the floor shows what that costs.

  python benchmarks/cross_entropy.py [--shape joyai]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_row, hot_path_args, measure_floors, report, time_op  # noqa: E402

SHAPES = {"small": (2048, 128, 4096), "joyai": (8192, 2048, 129280)}  # tokens, hidden, vocabulary


def peak_extra_gb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - start) / 1e9


def main() -> None:
    from megajoy.kernels.cross_entropy import linear_cross_entropy
    from megajoy.parallel.cross_entropy import vocab_parallel_cross_entropy

    args = hot_path_args(__doc__, "cross_entropy")
    floors = measure_floors(args.device, args.dtype)
    n, hidden, vocab = SHAPES[args.shape]
    h = torch.randn(n, hidden, device=args.device, dtype=args.dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=args.device, dtype=args.dtype) * 0.02).requires_grad_()
    target = torch.randint(0, vocab, (n,), device=args.device)
    grad = torch.full((n,), 1.0 / n, device=args.device)
    flops = 3 * 2 * n * vocab * hidden
    moved = 2 * (h.numel() + w.numel()) * h.element_size()

    def reference():
        logits = h @ w.T
        return torch.autograd.grad(vocab_parallel_cross_entropy(logits, target), (h, w), grad)

    base = time_op(reference, args.device)
    base_mem = peak_extra_gb(reference, args.device)
    rows = [bench_row(f"reference: full logits ({n} x {vocab})", base, flops, moved, floors, base,
                      **{"peak GB": base_mem})]
    for chunk in (1024, 4096):
        def fused(chunk=chunk):
            return torch.autograd.grad(linear_cross_entropy(h, w, target, chunk=chunk), (h, w), grad)

        seconds = time_op(fused, args.device)
        rows.append(bench_row(f"megajoy chunked, {chunk} tokens per chunk", seconds, flops, moved, floors, base,
                              **{"peak GB": peak_extra_gb(fused, args.device)}))
    report("cross_entropy", "Head + cross-entropy, forward + backward: megajoy chunked vs full logits", rows, args,
           floors)
    if args.device.type == "cuda":
        print("peak GB above the inputs: " + ", ".join(f"{r['case']}: {r['peak GB']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
