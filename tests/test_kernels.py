"""Kernels: the torch references (grouped GEMM, MoE permute / unpermute) and every fast path against them."""

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
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


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0]], ids=["rows", "no-rows"])
def test_grouped_mm_backward_takes_the_expanded_gradient_of_a_sum(counts):
    """out.sum() and out.sum(0) hand back zero-stride gradients, which _grouped_mm's backward refused
    (eager and compiled, and on a rank that received no tokens): the gradients of the per-expert loop."""
    from megajoy.kernels.grouped_gemm import _native_grouped_mm_ok

    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)
    assert _native_grouped_mm_ok(x, w)
    compiled = torch.compile(lambda a, b: grouped_mm(a, b, counts).sum(), backend="aot_eager", fullgraph=True)
    ref = _loop_reference(x, w, counts) if len(x) else x @ w[0]
    for loss, ref_loss in ((grouped_mm(x, w, counts).sum(), ref.sum()), (compiled(x, w), ref.sum()),
                           (grouped_mm(x, w, counts).sum(0).square().sum(), ref.sum(0).square().sum())):
        gx, gw = torch.autograd.grad(loss, (x, w))
        rx, rw = torch.autograd.grad(ref_loss, (x, w), retain_graph=True)
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


def test_fp32_grouped_mm_compiles_without_a_graph_break():
    """torch.compile's fake-tensor rule for _grouped_mm takes bf16 only; fp32 on CPU goes through
    megajoy's custom ops, in one graph (fullgraph=True), with the values and gradients of the per-expert
    loop, a transposed weight view included."""
    torch.manual_seed(0)
    x = torch.randn(24, 16, requires_grad=True)
    w_ENK = torch.randn(3, 32, 16, requires_grad=True)
    counts = torch.tensor([5, 0, 19])
    fn = lambda a, b: torch.tanh(grouped_mm(a, b.transpose(1, 2), counts))  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w_ENK)
    bounds = [0, 5, 5, 24]
    loop = torch.tanh(torch.cat([x[bounds[e]:bounds[e + 1]] @ w_ENK[e].t() for e in range(3)]))
    assert torch.allclose(compiled, loop, atol=1e-6)
    (gx, gw) = torch.autograd.grad(compiled.square().sum(), (x, w_ENK))
    (ex, ew) = torch.autograd.grad(loop.square().sum(), (x, w_ENK))
    assert torch.allclose(gx, ex, atol=1e-5) and torch.allclose(gw, ew, atol=1e-5)
    assert gw[1].abs().max() == 0  # the expert with no rows gets no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_combine_multiplies_and_sums_in_fp32(dtype):
    """The torch combine (CPU, `--kernels torch`, compiled runs) against the fp64 formula: rows times the
    fp32 weights summed in fp32 and rounded once; the weights' gradient as fp32 dot products whatever the
    rows' dtype (bf16 products and sums were 2e-3 off)."""
    from megajoy.kernels.moe_permute import unpermute_reference

    tokens, k, hidden = 32, 4, 256
    source = torch.argsort(torch.randint(0, 8, (tokens * k,)), stable=True)
    y = torch.randn(tokens * k, hidden).to(dtype).requires_grad_()
    w = torch.rand(tokens, k, requires_grad=True)
    g = torch.randn(tokens, hidden).to(dtype)
    out = unpermute_reference(y, source, w)
    out.backward(g)
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.zeros(tokens, hidden, dtype=torch.float64).index_add(
        0, source // k, y64 * w64.reshape(-1)[source].unsqueeze(-1))
    want.backward(g.double())
    rounding = 1e-6 if dtype == torch.float32 else 2**-8
    assert out.dtype == y.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert rel_err(out, want) <= rounding and rel_err(y.grad, y64.grad) <= rounding
    assert rel_err(w.grad, w64.grad) <= 1e-6


# ------------------------------------------------------------------------------- fast paths (Triton, fused)
# Each fast path against its torch reference computed in float64. On CPU the Triton kernels run in
# Triton's interpreter (conftest sets TRITON_INTERPRET=1), in fp32; on a GPU they run compiled, in fp32
# and bf16. Fresh random inputs each time; NaN never passes (rel_err of NaN is NaN, which fails <=).

from megajoy.kernels import backend  # noqa: E402

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not backend.triton_available(), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def triton_backend():
    with backend.kernel_settings(backend="triton"):
        yield


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return [out] + list(torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out))


def _compare(fast, reference, inputs, dtype, grad_dtype=None):
    """fast(*inputs) and its input gradients vs reference(*inputs in float64 on CPU)."""
    with torch.no_grad():
        probe = fast(*inputs)
    grad_out = torch.randn(probe.shape, device=probe.device).to(grad_dtype or probe.dtype)
    got = _grads(fast, inputs, grad_out)
    ref_inputs = [t.detach().double().cpu().requires_grad_(t.requires_grad) if t.is_floating_point()
                  else t.cpu() for t in inputs]
    want = _grads(reference, ref_inputs, grad_out.double().cpu())
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel(g.cpu(), w) <= TOL[dtype], (rel(g.cpu(), w), g.dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [16, 96, 1536])
def test_triton_swiglu_matches_reference(triton_backend, dtype, n):
    """Separate gate / up (one a strided view) and the experts' packed [.., 2I] layout, whose gradient is
    one tensor; widths below, at and above one tile, rows not a multiple of a tile."""
    from megajoy.kernels.swiglu import swiglu, swiglu_packed, swiglu_reference

    wide = torch.randn(3, 37, 2 * n, device=DEVICE, dtype=dtype)
    gate = wide[..., :n].requires_grad_()  # a row-strided view
    up = torch.randn(3, 37, n, device=DEVICE, dtype=dtype, requires_grad=True)
    _compare(swiglu, swiglu_reference, [gate, up], dtype)
    packed = (3 * torch.randn(111, 2 * n, device=DEVICE)).to(dtype).requires_grad_()  # silu's curved range too
    _compare(swiglu_packed, lambda x: swiglu_reference(*x.chunk(2, dim=-1)), [packed], dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 96, 1536])
def test_triton_rmsnorm_matches_reference(triton_backend, dtype, n):
    from megajoy.kernels.rmsnorm import rms_norm, rms_norm_reference

    x = torch.randn(3, 37, n, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=DEVICE)).to(dtype).requires_grad_()
    _compare(lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], dtype)


@needs_triton
def test_triton_rmsnorm_takes_a_strided_weight(triton_backend):
    """A weight that is a strided view (a column of a wider tensor) and a strided x: the kernels read the
    weight as one dense row, so a view has to be made dense first (it was read past its elements)."""
    from megajoy.kernels.rmsnorm import rms_norm, rms_norm_reference

    x = torch.randn(5, 2 * 48, device=DEVICE)[:, ::2].requires_grad_()
    w = (1 + 0.1 * torch.randn(48, 3, device=DEVICE))[:, 1].requires_grad_()
    _compare(lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rope_matches_reference_on_strided_views(triton_backend, dtype):
    """q's rotary part is a slice of a wider head (a strided view), the key's a broadcast single head."""
    from megajoy.kernels.rope import apply_rope, apply_rope_reference

    angles = torch.rand(2, 11, 8, device=DEVICE) * 6
    cos, sin = angles.cos() * 1.1, angles.sin() * 1.1
    wide = torch.randn(2, 11, 3, 24, device=DEVICE, dtype=dtype, requires_grad=True)
    ref_cos, ref_sin = cos.double().cpu(), sin.double().cpu()
    _compare(lambda a: apply_rope(a[..., 8:], cos, sin), lambda a: apply_rope_reference(a[..., 8:], ref_cos, ref_sin),
             [wide], dtype)
    k = torch.randn(2, 11, 16, device=DEVICE, dtype=dtype).unsqueeze(2).requires_grad_()
    _compare(lambda a: apply_rope(a, cos, sin), lambda a: apply_rope_reference(a, ref_cos, ref_sin), [k], dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_permute_unpermute_match_reference(triton_backend, dtype):
    from megajoy.kernels import moe_permute as mp

    tokens, k, experts, hidden = 45, 4, 8, 40
    ids = torch.stack([torch.randperm(experts, device=DEVICE)[:k] for _ in range(tokens)])
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
    weights = torch.rand(tokens, k, device=DEVICE, requires_grad=True)

    def through(x_, w_, perm, unperm):
        x_perm, counts, source = perm(x_, ids.to(x_.device))
        y = x_perm * torch.arange(1, x_perm.shape[0] + 1, device=x_.device, dtype=x_.dtype)[:, None] / 50
        return unperm(y, source, w_)

    def fast(x_, w_):
        return through(x_, w_, lambda a, i: mp.permute(a, i, experts), mp.unpermute)

    def reference(x_, w_):
        def ref_perm(a, i):
            flat = i.reshape(-1)
            source = torch.argsort(flat, stable=True)
            return a.index_select(0, source // k), torch.bincount(flat, minlength=experts), source
        return through(x_, w_, ref_perm, mp.unpermute_reference)

    _compare(fast, reference, [x, weights], dtype)


@needs_triton
@pytest.mark.parametrize("experts, k, normalise, method", [(12, 3, True, "noaux_tc"), (64, 8, True, "noaux_tc"),
                                                           (16, 4, False, "noaux_tc"), (20, 2, True, "greedy")])
def test_triton_router_matches_reference(triton_backend, experts, k, normalise, method):
    """The fused router against the torch reference in float64: the same experts in the same order (by
    score + bias, which the bias changes), weights and scores, and the logits' gradient through both the
    weights and the scores (the balance loss reads the scores); expert counts that are not a power of two,
    rows not a multiple of a program's."""
    from types import SimpleNamespace

    from megajoy.kernels.router import route, route_reference

    cfg = SimpleNamespace(n_group=1, topk_group=1, topk_method=method, num_experts_per_tok=k,
                          norm_topk_prob=normalise, routed_scaling_factor=2.5)
    logits = (2 * torch.randn(301, experts, device=DEVICE)).requires_grad_()
    bias = 0.3 * torch.randn(experts, device=DEVICE)
    with torch.no_grad():  # a diverged row (all NaN) and one NaN among finite logits: NaN ranks first, as in torch
        nan_logits = logits.detach().clone()
        nan_logits[0], nan_logits[1, 2] = float("nan"), float("nan")
        nan_ids = route(nan_logits, bias, cfg)[0].cpu()
        ref_nan_ids = route_reference(nan_logits.cpu(), bias.cpu(), cfg)[0]
        assert torch.equal(nan_ids[1:], ref_nan_ids[1:]) and nan_ids[1, 0] == 2
        assert len(set(nan_ids[0].tolist())) == k and int(nan_ids.max()) < experts  # distinct real experts
    d_weights, d_scores = torch.randn(301, k, device=DEVICE), torch.randn(301, experts, device=DEVICE)
    ids, weights, scores = route(logits, bias, cfg)
    ref_logits = logits.detach().double().cpu().requires_grad_()
    ref_ids, ref_weights, ref_scores = route_reference(ref_logits, bias.double().cpu(), cfg)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), ref_ids)
    assert torch.equal(ids.cpu(), ref_scores.topk(k, -1).indices) == (method == "greedy")  # the bias steered some
    assert rel(weights.cpu(), ref_weights) <= 1e-6 and rel(scores.cpu(), ref_scores) <= 1e-6
    for through_scores in (False, True):
        out = (weights * d_weights).sum() + ((scores * d_scores).sum() if through_scores else 0)
        ref_out = (ref_weights * d_weights.double().cpu()).sum() + (
            (ref_scores * d_scores.double().cpu()).sum() if through_scores else 0)
        got, = torch.autograd.grad(out, logits, retain_graph=True)
        want, = torch.autograd.grad(ref_out, ref_logits, retain_graph=True)
        assert rel(got.cpu(), want) <= 1e-5, through_scores


@needs_triton
def test_triton_kernels_write_every_element(triton_backend):
    """Outputs come from torch.empty: poison the allocator's memory first, then check no NaN is left."""
    from megajoy.kernels.moe_permute_triton import gather_rows, gather_sum, row_dots
    from megajoy.kernels.rmsnorm_triton import forward

    for _ in range(3):
        torch.full((1 << 16,), float("nan"), device=DEVICE)
        x = torch.randn(17, 1100, device=DEVICE)  # wider than one 1024-column block
        index = torch.randint(0, 17, (23,), device=DEVICE)
        assert torch.equal(gather_rows(x, index), x[index])
        idx_TK = torch.randint(0, 17, (5, 3), device=DEVICE)
        assert torch.allclose(gather_sum(x, idx_TK, None), x[idx_TK].sum(1), atol=1e-5)
        assert torch.allclose(row_dots(x[:5], idx_TK, x), (x[:5, None] * x[idx_TK]).sum(-1), rtol=1e-5, atol=1e-3)
        y, rstd = forward(x, torch.ones(1100, device=DEVICE), 1e-6, torch.float32)
        assert not y.isnan().any() and not rstd.isnan().any()


@pytest.mark.parametrize("chunk", [5, 64])
def test_chunked_linear_cross_entropy_matches_full_logits(chunk):
    """Loss and both gradients (under arbitrary per-token weights, as DPO and RL use) equal
    cross_entropy(h @ W^T) in float64; chunk 5 does not divide the 23 tokens."""
    from megajoy.kernels.cross_entropy import linear_cross_entropy

    h = torch.randn(23, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    target = torch.randint(0, 50, (23,))
    grad = torch.randn(23)
    got = _grads(lambda a, b: linear_cross_entropy(a, b, target, chunk=chunk), [h, w], grad)
    ref_in = [h.detach().double().requires_grad_(), w.detach().double().requires_grad_()]
    want = _grads(lambda a, b: F.cross_entropy(a @ b.T, target, reduction="none"), ref_in, grad.double())
    for g, r in zip(got, want):
        assert rel(g, r) <= 1e-6


def test_chunked_linear_cross_entropy_under_bf16_autocast_equals_autocast_linear():
    """Under bf16 autocast the chunks' GEMMs run in bf16 as F.linear's would: the same logits, so the same
    loss; gradients agree to bf16 rounding (the reference's dW is one bf16 GEMM, ours sums chunks in fp32)."""
    from megajoy.kernels.cross_entropy import linear_cross_entropy

    h = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(300, 32) * 0.5).requires_grad_()
    target, grad = torch.randint(0, 300, (64,)), torch.randn(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda a, b: linear_cross_entropy(a, b, target, chunk=16), [h, w], grad)
        want = _grads(lambda a, b: F.cross_entropy(F.linear(a, b).float(), target, reduction="none"), [h, w], grad)
    assert got[0].dtype == torch.float32 and (got[0] - want[0]).abs().max() <= 1e-5
    assert rel(got[1], want[1]) <= 1e-2 and rel(got[2], want[2]) <= 1e-2


def test_chunked_linear_cross_entropy_ignores_negative_targets_as_cross_entropy_does():
    from megajoy.kernels.cross_entropy import linear_cross_entropy

    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    target = torch.tensor([3, -100, 7, -100, 0, 29, 5, -100, 1, 2])
    grad = torch.randn(10)
    got = _grads(lambda a, b: linear_cross_entropy(a, b, target, chunk=4), [h, w], grad)
    want = _grads(lambda a, b: F.cross_entropy(a @ b.T, target, reduction="none"), [h, w], grad)
    assert (got[0][target < 0] == 0).all() and (got[1][target < 0] == 0).all()
    for g, r in zip(got, want):
        assert rel(g, r) <= 1e-5


def _chunked_ce_tp_worker(rank, world):
    import torch.distributed as dist

    from megajoy.kernels.cross_entropy import linear_cross_entropy
    from megajoy.launch import init_distributed, launch_env

    init_distributed(launch_env(), backend="gloo")  # forked CPU ranks, also on a machine with a GPU
    g = torch.Generator().manual_seed(0)
    h = torch.randn(19, 8, generator=g)
    w = torch.randn(48, 8, generator=g)
    target = torch.randint(0, 48, (19,), generator=g)
    grad = torch.randn(19, generator=g)
    h_local = h.clone().requires_grad_()
    w_local = w.chunk(world, 0)[rank].clone().requires_grad_()
    loss = linear_cross_entropy(h_local, w_local, target, dist.group.WORLD, chunk=6)
    loss.backward(grad)
    dist.all_reduce(h_local.grad)  # enter_tp's backward: the vocabulary slices' partial dh summed
    return loss.detach(), h_local.grad, w_local.grad


@pytest.mark.skipif(CUDA, reason="forked gloo ranks cannot follow CUDA autograd run earlier in the parent process")
def test_chunked_linear_cross_entropy_over_vocab_parallel_ranks():
    from megajoy.parallel.spawn import run_workers

    results = run_workers(2, _chunked_ce_tp_worker)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(19, 8, generator=g, dtype=torch.float32).double().requires_grad_()
    w = torch.randn(48, 8, generator=g).double().requires_grad_()
    target = torch.randint(0, 48, (19,), generator=g)
    grad = torch.randn(19, generator=g).double()
    ref = F.cross_entropy(h @ w.T, target, reduction="none")
    ref.backward(grad)
    for rank, (loss, gh, gw) in enumerate(results):
        assert rel(loss, ref.detach()) <= 1e-6 and rel(gh, h.grad) <= 1e-6
        assert rel(gw, w.grad.chunk(2, 0)[rank]) <= 1e-6


def test_model_loss_and_gradients_equal_with_the_chunked_head():
    """The whole tiny model (LM + MTP losses) with the fused head + cross-entropy in 7-token chunks."""
    from helpers import random_model, small_config

    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    labels = torch.randint(0, cfg.vocab_size, (2, 24))

    def run():
        model.zero_grad()
        out = model(ids, labels=labels, compute_mtp=True)
        (out.lm_loss + out.mtp_loss).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    with backend.kernel_settings(cross_entropy_chunk=7):
        chunked, chunked_grads = run()
    assert abs(chunked.lm_loss.item() - plain.lm_loss.item()) <= 1e-5 * plain.lm_loss.item()
    assert abs(chunked.mtp_loss.item() - plain.mtp_loss.item()) <= 1e-5 * plain.mtp_loss.item()
    assert rel(chunked.lm_token_loss, plain.lm_token_loss) <= 1e-6
    assert plain_grads.keys() == chunked_grads.keys()
    for name in plain_grads:
        assert rel(chunked_grads[name], plain_grads[name]) <= 1e-5, name


def test_kernel_backend_settings_reject_bad_values():
    from megajoy.config import TrainConfig

    with pytest.raises(ValueError, match="must be one of auto, torch, triton"):
        backend.configure(backend="cuda")
    with pytest.raises(ValueError, match="kernels='cuda' must be auto, torch or triton"):
        TrainConfig(kernels="cuda")
    with pytest.raises(ValueError, match="cross_entropy_chunk=-1 must be >= 0"):
        TrainConfig(cross_entropy_chunk=-1)


@needs_triton
def test_triton_backend_on_cpu_without_the_interpreter_says_how(monkeypatch):
    from megajoy.kernels.cross_entropy import linear_cross_entropy

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend.kernel_settings(backend="triton"), pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        backend.use_triton(torch.zeros(1))
    with pytest.raises(ValueError, match="chunk=0 must be positive"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), chunk=0)
    with pytest.raises(ValueError, match="cross_entropy_chunk=-3 must be >= 0"):
        backend.configure(cross_entropy_chunk=-3)


@pytest.mark.parametrize("lengths", [[100, 28, 300, 84], [512], [128, 128, 256], [5, 600, 40, 3]])
def test_document_block_mask_lists_exactly_the_blocks_that_attend(lengths):
    """Per (query block, key block): listed iff some allowed pair lies in it, and marked full (no
    per-element mask) only if every real pair in it is allowed. Row 2 packs three near-equal documents,
    row 3 reuses document ids out of order; 648 tokens do not fill the last 128-token block. The listed
    blocks equal those torch's create_block_mask finds by evaluating every pair, the backward's lists
    those torch derives from them, and FlexAttention with the mask (eager on CPU) equals the dense-mask
    SDPA reference in float64."""
    import warnings

    from torch.nn.attention.flex_attention import _transpose_ordered, create_block_mask

    from megajoy.kernels.attention import FLEX_BLOCK, attention, document_block_mask

    seq = sum(lengths)
    thirds = torch.tensor([seq // 3, seq // 3, seq - 2 * (seq // 3)])
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)),
                        torch.repeat_interleave(torch.arange(3), thirds),
                        torch.repeat_interleave(torch.tensor([2, 0, 2]), thirds)])
    mask = document_block_mask(docs)
    positions = torch.arange(seq)
    allowed = (positions[None, :, None] >= positions[None, None, :]) & (docs[:, :, None] == docs[:, None, :])
    blocks = -(-seq // FLEX_BLOCK)
    padded = torch.zeros(3, blocks * FLEX_BLOCK, blocks * FLEX_BLOCK, dtype=torch.bool)
    real = torch.zeros_like(padded)
    padded[:, :seq, :seq], real[:, :seq, :seq] = allowed, True
    as_blocks = lambda t: t.view(3, blocks, FLEX_BLOCK, blocks, FLEX_BLOCK)  # noqa: E731
    any_allowed = as_blocks(padded).any(dim=(2, 4))
    all_allowed = (as_blocks(padded) | ~as_blocks(real)).all(dim=(2, 4))
    listed, full = mask.to_dense()[:, 0].bool(), torch.zeros(3, blocks, blocks, dtype=torch.bool)
    for b in range(3):
        for q in range(blocks):
            full[b, q, mask.full_kv_indices[b, 0, q, :mask.full_kv_num_blocks[b, 0, q]].long()] = True
    assert torch.equal(listed, any_allowed)
    assert not (full & ~all_allowed).any() and full.any()
    theirs = create_block_mask(lambda b, h, q, k: (k <= q) & (docs[b, q] == docs[b, k]), 3, None, seq, seq, device="cpu")
    assert torch.equal(listed, theirs.to_dense()[:, 0].bool())
    # the backward's per-key-block lists, built beside the forward's: as torch derives them from those
    for ours, torchs in zip((mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices),
                            _transpose_ordered(mask.kv_num_blocks, mask.kv_indices)
                            + _transpose_ordered(mask.full_kv_num_blocks, mask.full_kv_indices)):
        assert ours.dtype == torch.int32 and ours.is_contiguous() and torch.equal(ours, torchs)
    q, k = torch.randn(3, seq, 3, 24, dtype=torch.float64), torch.randn(3, seq, 3, 24, dtype=torch.float64)
    v = torch.randn(3, seq, 3, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that eager mode is slow
        got = attention(q, k, v, 0.2, docs, mask)
    assert rel(got, attention(q, k, v, 0.2, docs, None)) <= 1e-12


# ------------------------------------------------------------------------------------- GPU-only fast paths

@needs_cuda
@pytest.mark.parametrize("docs", [None, [100, 28, 300, 84], [512]])
def test_flex_document_attention_matches_dense_mask_sdpa(docs):
    """MLA's shapes (qk 192, v 128) through the CUDA path (FlexAttention with a block mask, or causal SDPA
    for one document per row) against the dense-mask SDPA reference in float64 on CPU; bf16 inputs."""
    from megajoy.kernels.attention import attention, prepare_document_mask

    b, s, h = 2, 512, 4
    q, k = (torch.randn(b, s, h, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(b, s, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = None if docs is None else torch.repeat_interleave(
        torch.arange(len(docs)), torch.tensor(docs)).expand(b, s).contiguous().cuda()
    mask = prepare_document_mask(ids)
    assert (mask is not None) == (ids is not None)
    scale = 192 ** -0.5
    reference_ids = None if ids is None else ids.cpu()
    _compare(lambda q_, k_, v_: attention(q_, k_, v_, scale, ids, mask),
             lambda q_, k_, v_: attention(q_, k_, v_, scale, reference_ids if reference_ids is not None
                                          else torch.zeros(b, s, dtype=torch.long)),
             [q, k, v], torch.bfloat16)


@needs_cuda
def test_grouped_mm_under_bf16_autocast_takes_the_grouped_kernel():
    counts = torch.tensor([130, 0, 7, 300], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", requires_grad=True)
    w = torch.randn(4, 512, 256, device="cuda", requires_grad=True)  # [E, out, in] as the experts hold it
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = grouped_mm(x, w.transpose(1, 2), counts)
    assert out.dtype == torch.bfloat16
    ref = _loop_reference(x.detach().double().cpu(), w.detach().double().cpu().transpose(1, 2), counts.cpu())
    assert rel(out.float().cpu(), ref) <= 1e-2


@needs_cuda
def test_batched_newton_schulz_in_bf16_matches_float64():
    from megajoy.optim.muon import newton_schulz

    g = torch.randn(16, 256, 96, device="cuda")
    fast = newton_schulz(g, dtype=torch.bfloat16)
    ref = newton_schulz(g.double().cpu(), dtype=torch.float64)
    assert rel(fast.float().cpu(), ref) <= 3e-2  # 1.3e-2 seen for bf16 on CPU


@needs_cuda
def test_model_fast_paths_equal_the_torch_reference_on_gpu():
    """The tiny model with packed documents under bf16 autocast: every fast path (Triton RMSNorm, RoPE,
    permute, FlexAttention, grouped GEMM, chunked head) against the torch back-end."""
    from helpers import random_model, small_config

    cfg = small_config()
    model = random_model(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor([90, 40, 126])).expand(2, -1).cuda()
    positions = torch.cat([torch.arange(n) for n in (90, 40, 126)]).expand(2, -1).cuda()

    def run(kernels):
        model.zero_grad()
        with backend.kernel_settings(backend=kernels), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, position_ids=positions, document_ids=docs, labels=ids.roll(-1, 1), compute_mtp=True)
            (out.lm_loss + out.mtp_loss).backward()
        return out, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run("torch")
    fast, fast_grads = run("auto")
    assert abs(fast.lm_loss.item() - ref.lm_loss.item()) <= 1e-2 * ref.lm_loss.item()
    for name, g in ref_grads.items():
        assert rel(fast_grads[name], g) <= 5e-2, name


@needs_triton
def test_every_triton_kernel_compiles_for_an_h100_without_spilling(tmp_path):
    """benchmarks/triton_compile.py compiles each Triton kernel's launches at JoyAI's shapes, fp32 and bf16,
    for sm_90 with Triton's front end and ptxas, no GPU needed: every `*_kernel` in megajoy/kernels compiles
    (the interpreter that runs their numerics above compiles nothing) and none spills registers."""
    import json
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kernels_dir = os.path.join(root, "megajoy", "kernels")
    sources = {name[:-3]: open(os.path.join(kernels_dir, name)).read() for name in os.listdir(kernels_dir)
               if name.endswith("_triton.py")}
    defined = {f"{module}.{kernel}" for module, text in sources.items()
               for kernel in re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", text)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "triton_compile.py"),
                           "--json", str(tmp_path / "compiled.json")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "compiled.json").read_text())["rows"]
    assert len(defined) == 10 and {r["kernel"] for r in rows} == defined
    for row in rows:
        assert row["spilled bytes"] == 0 and 0 < row["registers"] <= 255, row
