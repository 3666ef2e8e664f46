"""Reference kernels: grouped GEMM (native and padded fallback) and MoE permute / unpermute."""

import pytest
import torch

from megajoy.kernels.grouped_gemm import grouped_mm, padded_grouped_mm
from megajoy.kernels.moe_permute import permute, unpermute


def _loop_reference(x, w, counts):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(x[start:start + n] @ w[e])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("k, n", [(8, 16), (6, 7)])  # aligned (native path) and unaligned (fallback)
def test_grouped_mm_native_and_padded_equal_per_expert_loop(k, n):
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(int(counts.sum()), k, requires_grad=True)
    w = torch.randn(4, k, n, requires_grad=True)
    ref = _loop_reference(x, w, counts)
    for fn in (grouped_mm, padded_grouped_mm):
        out = fn(x, w, counts)
        assert torch.allclose(out, ref, atol=1e-6)
        g = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, w), g)
        rx, rw = torch.autograd.grad(ref, (x, w), g, retain_graph=True)
        assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


def test_permute_groups_by_expert_and_unpermute_sums_weighted():
    x = torch.randn(5, 3)
    ids = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])
    weights = torch.rand(5, 2)
    x_perm, counts, source = permute(x, ids, num_experts=3)
    assert counts.tolist() == [3, 3, 4]
    experts_in_order = ids.flatten()[source]
    assert torch.equal(experts_in_order, torch.sort(experts_in_order).values)
    assert torch.equal(x_perm, x[source // 2])
    # Identity experts: the combine is sum_k w_k * x.
    out = unpermute(x_perm, source, weights)
    assert torch.allclose(out, x * weights.sum(1, keepdim=True), atol=1e-6)


def test_grouped_mm_aligned_shapes_take_the_native_path():
    from megajoy.kernels.grouped_gemm import _native_grouped_mm_ok

    assert _native_grouped_mm_ok(torch.randn(4, 8), torch.randn(2, 16, 8).transpose(1, 2))
    assert not _native_grouped_mm_ok(torch.randn(4, 6), torch.randn(2, 6, 7))


def test_fp32_grouped_mm_traces_under_torch_compile():
    """torch.compile's fake-tensor rule for _grouped_mm takes bf16 only; fp32 on CPU runs eagerly inside
    the compiled function, with the same values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(24, 16, requires_grad=True)
    w = torch.randn(3, 16, 32, requires_grad=True)
    counts = torch.tensor([5, 0, 19])
    eager = grouped_mm(x, w, counts)
    compiled = torch.compile(lambda a, b: grouped_mm(a, b, counts), backend="aot_eager", fullgraph=False)(x, w)
    assert torch.equal(compiled, eager)
    (gx, gw) = torch.autograd.grad(compiled.square().sum(), (x, w))
    (ex, ew) = torch.autograd.grad(eager.square().sum(), (x, w))
    assert torch.allclose(gx, ex) and torch.allclose(gw, ew)
