"""MLA's core attention (qk head 192, v head 128) forward and forward + backward, one document per row
and packed documents: megajoy's path (on a GPU, FlexAttention with a block-sparse document mask, which
the model builds once per forward for all layers and is timed on its own row, or SDPA's causal kernels) against the reference, SDPA with a dense [S, S] document mask.
FLOPs count only the allowed (query, key) pairs (causal, same document): per pair 2 (qk + v) forward
and 2 (3 qk + 2 v) backward (scores recomputed, dV, dP, dQ, dK); the floor is those at the matmul rate.

  python benchmarks/attention.py [--shape joyai]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_row, hot_path_args, measure_floors, report, time_op  # noqa: E402

SHAPES = {"small": (2, 512, 4, 192, 128), "joyai": (2, 4096, 32, 192, 128)}  # batch, seq, heads, qk, v


def document_lengths(seq: int, generator: torch.Generator) -> list[int]:
    """Packed-row documents: lengths drawn up to a quarter of the row, the last one cut to fit."""
    lengths = []
    while sum(lengths) < seq:
        lengths.append(min(int(torch.randint(16, seq // 4, (1,), generator=generator)), seq - sum(lengths)))
    return lengths


def main() -> None:
    from megajoy.kernels.attention import attention, prepare_document_mask

    args = hot_path_args(__doc__, "attention")
    floors = measure_floors(args.device, args.dtype)
    b, s, h, dqk, dv = SHAPES[args.shape]
    q, k = (torch.randn(b, s, h, dqk, device=args.device, dtype=args.dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(b, s, h, dv, device=args.device, dtype=args.dtype, requires_grad=True)
    dout = torch.randn(b, s, h, dv, device=args.device, dtype=args.dtype)
    scale = dqk ** -0.5
    lengths = document_lengths(s, torch.Generator().manual_seed(0))
    docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).expand(b, s).contiguous()
    docs = docs.to(args.device)
    one_doc = torch.zeros_like(docs)
    rows = []
    for layout, pairs, ids in (("one document per row", s * (s + 1) // 2, None),
                               (f"{len(lengths)} packed documents", sum(n * (n + 1) // 2 for n in lengths), docs)):
        forward_flops = 2 * b * h * pairs * (dqk + dv)
        backward_flops = 2 * b * h * pairs * (3 * dqk + 2 * dv)
        io = sum(t.numel() * t.element_size() for t in (q, k, v, dout))

        mask = prepare_document_mask(ids)  # built once per forward in the model, shared by every layer

        def fast_fn():
            return attention(q, k, v, scale, ids, mask)

        def base_fn():
            return attention(q, k, v, scale, ids if ids is not None else one_doc, None)

        cases = (("forward", forward_flops, io), ("forward + backward", forward_flops + backward_flops, 3 * io))
        for label, flops, moved in cases:
            if label == "forward":
                fast, base = time_op(fast_fn, args.device), time_op(base_fn, args.device)
            else:
                fast = time_op(lambda: torch.autograd.grad(fast_fn(), (q, k, v), dout), args.device)
                base = time_op(lambda: torch.autograd.grad(base_fn(), (q, k, v), dout), args.device)
            rows.append(bench_row(f"{layout} [{b}, {s}, {h}] {label}", fast, flops, moved, floors, base))
        if ids is not None and mask is not None:
            build = time_op(lambda: prepare_document_mask(ids), args.device)
            rows.append(bench_row("building the block mask (once per forward)", build, 0, ids.numel() * 8, floors))
    report("attention", "MLA attention: megajoy vs dense-mask SDPA", rows, args, floors, documents=lengths)


if __name__ == "__main__":
    main()
