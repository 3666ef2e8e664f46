"""Activation recomputation (`--recompute-granularity full | selective`): the same gradients as keeping
every activation, and what a forward counts (the router's expert load, QK-clip's largest logits) counted
once. The parallel layouts with recomputation are in test_parallel_training.py, the memory it saves
(measured by the allocator) in test_memory.py."""

import pytest
import torch
from helpers import random_model, small_config
from megajoy.config import RECOMPUTE_MODULES
from megajoy.model.recompute import Recompute
from megajoy.optim.qk_clip import track_max_logits
from megajoy.model.moe import Router
from megajoy.model.mla import MLA


def _forward_backward(recompute, autocast=False, compiled=False):
    cfg = small_config(num_hidden_layers=4, first_k_dense_replace=1)
    model = random_model(cfg, seed=5).train()
    model.recompute = recompute
    track_max_logits(model, True)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    step = torch.compile(model, backend="aot_eager") if compiled else model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = step(ids, labels=torch.roll(ids, -1, 1), compute_mtp=True)
    (out.lm_loss + out.mtp_loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    loads = [m.expert_load.clone() for m in model.modules() if isinstance(m, Router)]
    logits = [m.max_logit.clone() for m in model.modules() if isinstance(m, MLA)]
    return out.lm_loss.item(), grads, loads, logits


SELECTIVE = [Recompute(modules=(m,)) for m in RECOMPUTE_MODULES] + [Recompute(modules=RECOMPUTE_MODULES)]


@pytest.mark.parametrize("recompute", [Recompute("uniform", 1), Recompute("uniform", 3), Recompute("block", 2)]
                         + SELECTIVE, ids=str)
def test_recomputation_changes_nothing_but_memory(recompute):
    loss, grads, loads, logits = _forward_backward(None)
    r_loss, r_grads, r_loads, r_logits = _forward_backward(recompute)
    assert r_loss == loss and r_grads.keys() == grads.keys()
    assert all(torch.equal(r_grads[n], g) for n, g in grads.items())
    assert len(loads) == 3 and all(torch.equal(a, b) for a, b in zip(r_loads, loads))  # not counted twice
    assert sum(int(x.sum()) for x in loads) == 3 * 2 * 24 * 2  # layers x tokens x top-k
    assert all(torch.equal(a, b) for a, b in zip(r_logits, logits))


def test_selective_recomputation_under_autocast():
    """Released outputs are rebuilt in the forward's autocast dtype: bit-identical gradients under bf16
    autocast (core_attn keeps q, k, v, which mla_up_proj releases, so the rebuilt values are read). The
    layernorm module casts the norm's output once for both projections, so their gradients add in bf16:
    equal to bf16 rounding."""
    _, grads, _, _ = _forward_backward(None, autocast=True)
    _, same, _, _ = _forward_backward(Recompute(modules=("core_attn", "mla_up_proj", "moe_act", "moe")), autocast=True)
    assert all(torch.equal(same[n], g) for n, g in grads.items())
    _, normed, _, _ = _forward_backward(Recompute(modules=("layernorm",)), autocast=True)
    errors = [((normed[n] - g).norm() / g.norm()).item() for n, g in grads.items()]
    assert max(errors) < 2e-2, max(errors)


def test_recomputation_chunks():
    layers = list(range(5))
    assert Recompute("uniform", 2).chunks(layers) == [([0, 1], True), ([2, 3], True), ([4], True)]
    assert Recompute("block", 2).chunks(layers) == [([0], True), ([1], True), ([2, 3, 4], False)]
    assert Recompute("block", 7).chunks(layers) == [([i], True) for i in layers]


def test_recompute_flags_are_checked():
    from megajoy.config import load_job_config

    with pytest.raises(ValueError, match="recompute_granularity='partial' must be full, selective or null"):
        load_job_config("tiny", None, ["train.recompute_granularity=partial"])
    with pytest.raises(ValueError, match=r"recompute_modules: \['attention'\] unknown"):
        load_job_config("tiny", None, ["train.recompute_granularity=selective", 'train.recompute_modules=["attention"]'])
    with pytest.raises(ValueError, match="recompute_modules needs recompute_granularity=selective"):
        load_job_config("tiny", None, ['train.recompute_modules=["moe_act"]'])
    selective = load_job_config("tiny", None, ["train.recompute_granularity=selective"]).train
    assert Recompute.of(selective) == Recompute(modules=("core_attn",))  # Megatron's default
    with pytest.raises(ValueError, match="recompute_num_layers=0 must be >= 1"):
        load_job_config("tiny", None, ["train.recompute_num_layers=0"])
    zero_bubble = ["train.recompute_granularity=full", "parallel.pipeline_model_parallel_size=2",
                   "parallel.pipeline_schedule=zero-bubble"]
    with pytest.raises(ValueError, match="recompute_granularity with pipeline_schedule=zero-bubble is not supported"):
        load_job_config("tiny", None, zero_bubble)
    assert load_job_config("tiny", None, zero_bubble[:2]).train.recompute_granularity == "full"


def test_selective_recomputation_leaves_fp8_numerics_alone():
    """FP8 GEMMs keep their own rounded copy of the input, so `layernorm` and `moe_act` release nothing
    there, and the norm's output is not pre-cast to bf16 (which would round it twice): the same loss and
    gradients under bf16 autocast as without recomputation."""
    from megajoy.quant.fp8 import Fp8Matmul
    from megajoy.quant.qat import set_fp8

    def run(recompute):
        cfg = small_config(num_hidden_layers=3, first_k_dense_replace=1)
        model = random_model(cfg, seed=5).train()
        set_fp8(model, Fp8Matmul("tensorwise", "emulate"))
        model.recompute = recompute
        ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=torch.roll(ids, -1, 1), compute_mtp=True)
        (out.lm_loss + out.mtp_loss).backward()
        return out.lm_loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run(None)
    r_loss, r_grads = run(Recompute(modules=("layernorm", "moe_act", "mla_up_proj")))
    assert r_loss == loss and all(torch.equal(r_grads[n], g) for n, g in grads.items())


def test_released_outputs_under_torch_compile():
    """Under torch.compile the released outputs' storage resizing runs eagerly between compiled graphs
    (`run_discarding` is kept out of tracing lazily, so a process that never compiles does not import
    torch._dynamo for it): the compiled step's gradients equal the eager step's that keeps everything."""
    _, grads, _, _ = _forward_backward(None)
    _, compiled, _, _ = _forward_backward(Recompute(modules=("moe_act", "layernorm", "mla_up_proj")), compiled=True)
    assert compiled.keys() == grads.keys() and all(torch.equal(compiled[n], g) for n, g in grads.items())
