"""The router: selection with the correction bias, weights without it; the aux-free bias update."""

import dataclasses

import pytest
import torch

from helpers import rel_err, small_config
from megajoy.model.moe import MoE, Router


def _hf_router(cfg, router):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = DeepseekV3Config(hidden_size=cfg.hidden_size, n_routed_experts=cfg.n_routed_experts,
                              num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
                              topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                              routed_scaling_factor=cfg.routed_scaling_factor)
    ref = DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        ref.weight.copy_(router.weight)
        ref.e_score_correction_bias.copy_(router.e_score_correction_bias)
    return ref


@pytest.mark.parametrize("kw", [dict(), dict(norm_topk_prob=False), dict(n_group=4, topk_group=2, num_experts_per_tok=3)])
def test_router_matches_transformers(kw):
    cfg = small_config(**kw)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(64, cfg.hidden_size)
    routing = router(x)
    _, ref_weights, ref_ids = _hf_router(cfg, router)(x)
    ours = sorted(zip(routing.expert_ids_TK.flatten().tolist(), routing.weights_TK.flatten().tolist()))
    # Compare per token as sets of (expert, weight): the two may order the k experts differently.
    for t in range(x.shape[0]):
        a = dict(zip(routing.expert_ids_TK[t].tolist(), routing.weights_TK[t].tolist()))
        b = dict(zip(ref_ids[t].tolist(), ref_weights[t].tolist()))
        assert a.keys() == b.keys()
        assert all(abs(a[e] - b[e]) <= 1e-6 for e in a)
    assert ours  # non-empty


def test_bias_steers_selection_but_not_weights():
    cfg = small_config(n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, -1.0])  # scores ordered 0 > 1 > 2 > 3
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    scores = torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, -1.0]))
    assert set(router(x).expert_ids_TK[0].tolist()) == {0, 1}
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, -1.0, 0.0, 1.0]))
    routing = router(x)
    chosen = routing.expert_ids_TK[0].tolist()
    assert set(chosen) == {0, 3}  # expert 3 selected only through its bias
    expected = {e: 2.5 * scores[e].item() / (scores[0] + scores[3]).item() for e in (0, 3)}
    for e, w in zip(chosen, routing.weights_TK[0].tolist()):
        assert abs(w - expected[e]) <= 1e-6


def test_bias_update_moves_load_toward_balance():
    cfg = small_config(n_routed_experts=8, num_experts_per_tok=2)
    router = Router(cfg).train()
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
        router.weight[0] += 0.03  # experts 0 and 1 attract most tokens
        router.weight[1] += 0.02
    x = torch.randn(512, cfg.hidden_size).abs()

    def imbalance():
        router.expert_load.zero_()
        router(x)
        load = router.expert_load.float()
        return (load.max() / load.mean()).item(), load

    start, load = imbalance()
    assert start > 2.5
    for _ in range(300):
        _, load = imbalance()
        before = router.e_score_correction_bias.clone()
        router.update_bias(load, rate=1e-3)
        step = router.e_score_correction_bias - before
        # Overloaded experts lose bias, underloaded ones gain it, by exactly the rate.
        assert torch.allclose(step, 1e-3 * torch.sign(load.mean() - load))
    end, _ = imbalance()
    assert end < 1.1


def test_bias_stays_fp32_and_is_checkpointed():
    cfg = small_config()
    moe = MoE(cfg).to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.weight.dtype == torch.bfloat16
    assert "gate.e_score_correction_bias" in moe.state_dict()
    assert "gate.expert_load" not in moe.state_dict()


def test_sequence_balance_loss_reaches_router_gradient():
    cfg = dataclasses.replace(small_config(), aux_loss_alpha=1e-2)
    moe = MoE(cfg).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 8, cfg.hidden_size)
    moe(x).sum().backward()
    with_aux = moe.gate.weight.grad.clone()
    moe.zero_grad()
    cfg.aux_loss_alpha = 0.0
    moe(x).sum().backward()
    assert (with_aux - moe.gate.weight.grad).abs().max() > 1e-6


def test_router_scores_stay_fp32_under_autocast():
    """The scores are sigmoid(w . x) in fp32 even inside bf16 autocast (which casts F.linear's operands):
    the same scores, weights and experts as outside it."""
    cfg = small_config()
    router = Router(cfg).eval()
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    x = torch.randn(64, cfg.hidden_size)
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.scores_TE.dtype == torch.float32 and got.weights_TK.dtype == torch.float32
    assert torch.equal(got.scores_TE, want.scores_TE) and torch.equal(got.expert_ids_TK, want.expert_ids_TK)
    assert torch.equal(got.weights_TK, want.weights_TK)


def test_router_gradients_stay_fp32_when_backward_runs_under_autocast():
    """The trainer (and a pipeline schedule) calls backward inside its autocast block, which casts the
    backward GEMMs too: the router's weight and input gradients still equal the fp64 products of the same
    operands (bf16 GEMMs were 3e-3 off)."""
    cfg = small_config()
    router = Router(cfg).train()
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    x = torch.randn(64, cfg.hidden_size, requires_grad=True)
    g = torch.randn(64, cfg.n_routed_experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = router(x).scores_TE
        (scores * g).sum().backward()
    s = scores.detach().double()
    d_logits = g.double() * s * (1 - s)
    want_w, want_x = d_logits.T @ x.detach().double(), d_logits @ router.weight.detach().double()
    assert router.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert rel_err(router.weight.grad.double(), want_w) <= 1e-6 and rel_err(x.grad.double(), want_x) <= 1e-6


def _padded_row(cfg, real: int = 20, capacity: int = 33):
    """(a one-conversation SFT row padded to `capacity` tokens, the same row cut after its last real input)."""
    from megajoy.data.sft import Sample, packed_row

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, cfg.vocab_size, (real,), generator=g).tolist()
    row = packed_row([Sample(ids, [False] * 5 + [True] * (real - 5))], capacity, pad_id=0)
    cut = dataclasses.replace(row, **{name: t[:, :real] for name, t in row.tensors().items()})
    return row, cut


def _train_forward_backward(model, batch):
    """(each router's expert load, {name: gradient}) of a training forward and backward of the LM loss."""
    model.reset_statistics()
    model.zero_grad()
    out = model(batch.input_ids, batch.position_ids, batch.document_ids, batch.labels, batch.loss_mask,
                compute_mtp=False, padding_mask=batch.padding_mask)
    out.lm_loss_sum.backward()
    loads = [m.expert_load.clone() for m in model.modules() if isinstance(m, Router)]
    return loads, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padding_changes_no_gradient_and_no_expert_load():
    """A padded row trains exactly as the row without its padding: the loss masks the tail, attention keeps
    it in its own document, and the routers leave it out of the expert load (the aux-free bias update's
    input) and of the sequence-wise balance loss (Megatron-Core's padding_mask). Before, the 12 padding
    tokens were counted, and the balance loss averaged over them."""
    from helpers import random_model

    cfg = small_config(aux_loss_alpha=0.1)
    model = random_model(cfg, seed=2).train()
    row, cut = _padded_row(cfg)
    assert int(row.padding_mask.sum()) == 12 and not cut.padding_mask.any()
    padded_loads, padded_grads = _train_forward_backward(model, row)
    cut_loads, cut_grads = _train_forward_backward(model, cut)
    for padded, reference in zip(padded_loads, cut_loads):
        assert padded.tolist() == reference.tolist() and int(reference.sum()) == 20 * cfg.num_experts_per_tok
    assert padded_grads.keys() == cut_grads.keys()
    for name, grad in cut_grads.items():
        assert rel_err(padded_grads[name], grad) < 1e-5, name


def _router_loads_and_grads(model, batch):
    loads, grads = _train_forward_backward(model, batch)
    return loads, [grads[name] for name, _ in model.named_parameters() if name.endswith("gate.weight")]


def _padded_tensor_parallel_worker(rank, world, sequence_parallel):
    import torch.distributed as dist

    from helpers import TINY_MODEL_OVERRIDES
    from megajoy.config import load_job_config
    from megajoy.launch import setup_parallel
    from megajoy.model import create_model

    cfg = small_config(aux_loss_alpha=0.1)
    job = load_job_config("tiny", None, TINY_MODEL_OVERRIDES)
    job = dataclasses.replace(job, model=cfg, parallel=dataclasses.replace(
        job.parallel, tensor_model_parallel_size=2, sequence_parallel=sequence_parallel))
    model = create_model(cfg, pc=setup_parallel(job), seed=2).train()
    loads, router_grads = _router_loads_and_grads(model, _padded_row(cfg)[0])
    for t in loads + router_grads:  # each rank routed its half of the sequence
        dist.all_reduce(t)
    return loads, router_grads


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_padding_is_left_out_on_each_tensor_parallel_rank(sequence_parallel):
    """Under TP 2 (the MoE splits the tokens over the ranks, or SP splits the sequence) each rank leaves out
    its own part of the padding: the summed loads and router gradients are the single process's."""
    from megajoy.model import create_model
    from megajoy.parallel.spawn import run_workers

    cfg = small_config(aux_loss_alpha=0.1)
    loads, grads = _router_loads_and_grads(create_model(cfg, seed=2).train(), _padded_row(cfg)[0])
    for rank_loads, rank_grads in run_workers(2, _padded_tensor_parallel_worker, sequence_parallel):
        assert [x.tolist() for x in rank_loads] == [x.tolist() for x in loads]
        assert len(rank_grads) == len(grads) == 2
        for got, want in zip(rank_grads, grads):
            assert rel_err(got, want) < 1e-5
