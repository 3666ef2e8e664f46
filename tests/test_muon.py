"""Muon against torch.optim.Muon (bf16 Newton-Schulz) and a float64 computation of the same algorithm
(fp32); batched experts and heads; the tensor-parallel Gram scheme; QK-clip."""

import dataclasses

import pytest
import torch

from megajoy.config import OptimizerConfig
from megajoy.optim.muon import MatrixLayout, MuonEntry, MuonMatrices, newton_schulz
from megajoy.parallel.spawn import run_workers

SHAPES = [(64, 32), (32, 96), (48, 48)]


def _cfg(**kw):
    return dataclasses.replace(OptimizerConfig(optimizer="muon", lr=0.02, weight_decay=0.1), **kw)


def _run_ours(params, grads_per_step, cfg, dtype):
    entries = [MuonEntry(f"w{i}", p, MatrixLayout("matrix", global_shape=tuple(p.shape)), None, [0], None)
               for i, p in enumerate(params)]
    muon = MuonMatrices(entries, cfg, rank=0, ns_dtype=dtype)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        muon.step()
    return params


def _setup(seed=0, steps=3):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    return params, grads


def test_bf16_matches_torch_optim_muon():
    params, grads = _setup()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    for step_grads in grads:
        for p, g in zip(ref, step_grads):
            p.grad = g.clone()
        opt.step()
    ours = _run_ours(params, grads, _cfg(), torch.bfloat16)
    for a, b, start in zip(ours, ref, _setup()[0]):
        moved = (b - start).abs().max()
        # bf16 keeps 8 significant bits: differences stay at that level of the total update.
        assert (a - b).abs().max() <= moved * 2 ** -7, ((a - b).abs().max(), moved)


def _reference_float64(params, grads_per_step, lr=0.02, wd=0.1, mu=0.95, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    weights = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.double()
            bufs[i] = mu * bufs[i] + (1 - mu) * g
            u = (1 - mu) * g + mu * bufs[i]
            x = u.T if u.shape[0] > u.shape[1] else u
            x = x / x.norm()
            for _ in range(steps):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            o = x.T if u.shape[0] > u.shape[1] else x
            scale = 0.2 * max(u.shape) ** 0.5
            weights[i] = weights[i] * (1 - lr * wd) - lr * scale * o
    return weights


def test_fp32_matches_float64_reference():
    params, grads = _setup(1)
    expected = _reference_float64(params, grads)
    ours = _run_ours(params, grads, _cfg(), torch.float32)
    for a, b in zip(ours, expected):
        assert ((a.double() - b).norm() / b.norm()).item() <= 1e-6


def test_experts_and_heads_are_orthogonalised_one_matrix_each():
    g = torch.randn(3, 2 * 8, 12)  # 3 experts, fused gate / up of 8 rows each
    fused = newton_schulz(MatrixLayout("gate_up").to_matrices(g))
    for e in range(3):
        for half in range(2):
            alone = newton_schulz(g[e, half * 8:(half + 1) * 8].unsqueeze(0))[0]
            assert torch.allclose(fused[2 * e + half], alone, atol=1e-5)
    w = torch.randn(4 * 6, 10)  # 4 heads of 6 rows
    heads = newton_schulz(MatrixLayout("heads_rows", heads=4).to_matrices(w))
    assert torch.allclose(heads[2], newton_schulz(w[12:18].unsqueeze(0))[0], atol=1e-5)
    o = torch.randn(10, 4 * 6)  # o_proj: heads split the input columns
    layout = MatrixLayout("heads_cols", heads=4)
    per_head = newton_schulz(layout.to_matrices(o))
    assert torch.allclose(per_head[1], newton_schulz(o[:, 6:12].unsqueeze(0))[0], atol=1e-5)
    assert torch.equal(layout.from_matrices(layout.to_matrices(o), o), o)


def _sharded_ns_worker(rank, world):
    import torch.distributed as dist

    from megajoy.launch import init_distributed, launch_env

    init_distributed(launch_env())
    full = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(7))
    rows = newton_schulz(full.chunk(world, dim=1)[rank], sharded="rows", group=dist.group.WORLD)
    cols = newton_schulz(full.chunk(world, dim=2)[rank], sharded="cols", group=dist.group.WORLD)
    return rows, cols


def test_gram_all_reduce_equals_full_matrix_newton_schulz():
    """Shards split along rows (X^T X Gram) or columns (X X^T Gram) give the full matrix's result."""
    full = newton_schulz(torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(7)))
    results = run_workers(2, _sharded_ns_worker)
    for rank, (rows, cols) in enumerate(results):
        for got, want in ((rows, full.chunk(2, dim=1)[rank]), (cols, full.chunk(2, dim=2)[rank])):
            assert ((got - want).norm() / want.norm()).item() <= 1e-5


def _sharded_bf16_ns_worker(rank, world):
    import torch.distributed as dist

    from megajoy.launch import init_distributed, launch_env

    init_distributed(launch_env())
    full = torch.randn(4, 512, 128, generator=torch.Generator().manual_seed(7))
    return newton_schulz(full.chunk(world, dim=1)[rank], dtype=torch.bfloat16, sharded="rows", group=dist.group.WORLD)


def test_sharded_bf16_newton_schulz_is_as_close_as_unsharded():
    """Over 4 ranks (bf16 iterations, as on GPUs) the partial Grams are summed in fp32: the result is as
    far from fp32 Newton-Schulz as one rank's bf16 run (1.03x; summing them in bf16 was 1.12x)."""
    full = torch.randn(4, 512, 128, generator=torch.Generator().manual_seed(7))
    exact = newton_schulz(full)
    sharded = torch.cat(run_workers(4, _sharded_bf16_ns_worker), dim=1).float()
    error = lambda x: ((x - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(sharded) <= 1.06 * error(newton_schulz(full, dtype=torch.bfloat16).float())


def test_max_logit_is_tracked_in_fp32_under_autocast():
    """The tracked logit maximum is fp32 inside bf16 autocast too (which would run its q.k products as a
    bf16 bmm, rounding logits near QK-clip's tau = 100 to steps of 0.5), to the fp64 value of the same
    q and k."""
    from helpers import random_model, small_config

    attn = random_model(small_config()).train().layers["0"].self_attn
    q = torch.randn(2, 16, attn.num_heads, attn.nope_dim + attn.rope_dim) * 3
    k = torch.randn(2, 16, attn.num_heads, attn.nope_dim + attn.rope_dim) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn._record_max_logit(q, k, None)
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * attn.softmax_scale
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    want = scores.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3)).clamp(min=0)  # the buffer starts at 0
    assert want.max() > 20 and torch.allclose(attn.max_logit.double(), want, rtol=1e-6)


def test_qk_clip_brings_a_head_below_tau():
    from helpers import random_model, small_config
    from megajoy.optim.qk_clip import apply_qk_clip, track_max_logits

    model = random_model(small_config(), seed=3).train()
    attn = model.layers["1"].self_attn
    with torch.no_grad():
        attn.q_b_proj.weight[:attn.nope_dim + attn.rope_dim] *= 200  # head 0 gets large logits
    track_max_logits(model, True)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    model(ids, labels=torch.roll(ids, -1, 1))
    before = attn.max_logit.clone()
    tau = 5.0
    assert before[0] > tau and (before[1:] < tau).all()
    stats = apply_qk_clip(model, tau)
    assert stats["qk_clip_heads"] >= 1 and stats["max_attention_logit"] == pytest.approx(float(before.max()))
    model(ids, labels=torch.roll(ids, -1, 1))
    after = attn.max_logit
    assert after[0] == pytest.approx(tau, rel=1e-4)  # scaled by exactly tau / S
    assert torch.allclose(after[1:], before[1:], rtol=1e-5)  # other heads untouched


def test_max_logit_leaves_padding_out():
    """A padded row (SFT, RL) tracks the largest logit of its tokens only, as the same row without its
    padding does: logits among pad tokens are no data. Before, they raised heads' maxima (here 0.0268 ->
    0.0318 in layer 0, head 2), enough for QK-clip to shrink a head that no real logit brought to tau."""
    from helpers import random_model, small_config
    from megajoy.model.mla import MLA
    from megajoy.optim.qk_clip import track_max_logits

    model = random_model(small_config(), seed=3).train()
    track_max_logits(model, True)
    layers = [m for m in model.modules() if isinstance(m, MLA)]
    real, width = 10, 24
    ids = torch.randint(0, model.cfg.vocab_size, (1, width), generator=torch.Generator().manual_seed(0))
    ids[:, real:] = 7
    positions = torch.cat([torch.arange(real), torch.arange(width - real)])[None]
    documents = (torch.arange(width) >= real).long()[None]
    model(ids, positions, documents, torch.roll(ids, -1, 1), padding_mask=documents.bool())
    padded = [m.max_logit.clone() for m in layers]
    for m in layers:
        m.max_logit.zero_()
    model(ids[:, :real], positions[:, :real], documents[:, :real], torch.roll(ids, -1, 1)[:, :real])
    for got, want in zip(padded, [m.max_logit for m in layers]):
        assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_max_logit_scores_are_computed_a_block_of_queries_at_a_time(monkeypatch):
    """The tracked maximum never holds all [B, H, S, S] scores at once (2 GiB a layer for JoyAI's 32 heads at
    4K tokens, TiBs at the 128K of long-context training): blocks of queries, the largest tensor within
    the budget, and the same per-head maximum over causal, same-document, non-padding pairs as a float64
    computation of all scores."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from helpers import random_model, small_config
    from megajoy.model import mla

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest, *sizes])
            return out

    budget = 2 ** 13
    monkeypatch.setattr(mla, "MAX_LOGIT_BLOCK_ELEMENTS", budget, raising=False)
    attn = random_model(small_config()).train().layers["0"].self_attn
    g = torch.Generator().manual_seed(5)
    batch, seq, heads = 2, 40, attn.num_heads  # blocks of 2^13 // (2 * 4 * 40) = 25 queries: 25 + 15
    q, k = (torch.randn(batch, seq, heads, attn.nope_dim + attn.rope_dim, generator=g) * 3 for _ in range(2))
    documents = torch.tensor([[0] * 12 + [1] * 20 + [2] * 8, [0] * 30 + [1] * 10])
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[0, 32:] = padding[1, 30:] = True
    with LargestTensor() as mode:
        attn._record_max_logit(q, k, documents, padding)
    assert 0 < mode.largest <= budget
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * attn.softmax_scale
    real = ~padding
    allowed = (torch.ones(seq, seq, dtype=torch.bool).tril() & (documents[:, :, None] == documents[:, None, :])
               & real[:, :, None] & real[:, None, :])
    want = scores.masked_fill(~allowed[:, None], float("-inf")).amax(dim=(0, 2, 3)).clamp(min=0)
    assert want.max() > 20 and torch.allclose(attn.max_logit.double(), want, rtol=1e-6)
