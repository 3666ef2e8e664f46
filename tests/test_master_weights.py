"""bf16 weights over fp32 master weights (`--params-dtype bf16`): gradients accumulate in fp32 on the
masters, torch's AdamW steps the masters, checkpoints hold the masters and resume exactly, the run trains
as the fp32-weights autocast run does, and parallel layouts match the single process."""

import copy
import json
import os

import pytest
import torch
from helpers import TINY_MODEL_OVERRIDES, small_config
from megajoy.ckpt.native import load_model_dir
from megajoy.cli import main
from megajoy.model import create_model
from megajoy.optim.master_weights import MasterWeights
from megajoy.parallel.spawn import cli_worker, run_workers
from megajoy.train.checkpoint import latest_checkpoint


def _batch(seed: int, cfg, rows=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch[0], labels=batch[1], compute_mtp=True)
    return out.lm_loss + out.mtp_loss


def test_fp32_grad_accumulation_and_adamw_step_on_the_masters():
    """Two micro-batches: each master's gradient is the fp32 sum of the two bf16 gradients (not their bf16
    sum), torch's AdamW on the masters gives what it gives on an fp32 copy fed those sums, and the
    bf16 weights are the rounded masters afterwards."""
    cfg = small_config(num_nextn_predict_layers=1, tie_word_embeddings=True)
    model = create_model(cfg, seed=3).train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    masters = dict(model.named_parameters())
    weights = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight  # tied weights keep one copy
    optimizer = torch.optim.AdamW(masters.values(), lr=1e-2, weight_decay=0.1)

    batches = [_batch(1, cfg), _batch(2, cfg)]
    for batch in batches:
        _loss(model, batch).backward()
    weights.flush_grads()
    assert all(p.grad is None for p in model.parameters())

    ref_params = dict(reference_bf16.named_parameters())
    per_batch = [torch.autograd.grad(_loss(reference_bf16, b), list(ref_params.values()), allow_unused=True)
                 for b in batches]
    fp32_sums, bf16_sums = {}, {}
    for i, name in enumerate(ref_params):
        g1, g2 = per_batch[0][i], per_batch[1][i]
        fp32_sums[name] = g1.float() + g2.float()
        bf16_sums[name] = (g1 + g2).float()
    for name, master in masters.items():
        assert master.dtype == torch.float32 and master.grad.dtype == torch.float32
        assert torch.equal(master.grad, fp32_sums[name]), name
    assert any(not torch.equal(fp32_sums[n], bf16_sums[n]) for n in masters)  # the two sums do differ

    optimizer.step()
    reference = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
    for name, p in reference.items():
        p.grad = fp32_sums[name]
    torch.optim.AdamW(reference.values(), lr=1e-2, weight_decay=0.1).step()
    weights.copy_to_model()
    compute = dict(model.named_parameters())
    for name, master in masters.items():
        assert torch.equal(master, reference[name]), name
        assert torch.equal(compute[name], master.detach().to(torch.bfloat16)), name


def test_full_precision_puts_the_masters_back_for_the_block():
    cfg = small_config()
    model = create_model(cfg, seed=0)
    masters = dict(model.named_parameters())
    weights = MasterWeights(model)
    with weights.full_precision():
        with weights.full_precision():  # nested: a no-op, the outer block keeps the masters in place
            pass
        assert {n: p for n, p in model.named_parameters()} == masters
        with torch.no_grad():  # a change made meanwhile (a checkpoint load) reaches the bf16 copy
            model.layers["0"].self_attn.o_proj.weight.mul_(0.5)
    halved = masters["layers.0.self_attn.o_proj.weight"]
    assert torch.equal(model.layers["0"].self_attn.o_proj.weight, halved.detach().to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("fmt", ["int4", "q4_0", "q8_0"])
def test_fake_quant_reads_the_fp32_master(fmt):
    """QAT on bf16 copies quantises the fp32 masters (the checkpoint's weights), not their bf16 rounding,
    and its straight-through gradient reaches the master."""
    from megajoy.quant.formats import WeightFormat
    from megajoy.quant.qat import set_qat

    cfg = small_config(moe_intermediate_size=64)
    model = create_model(cfg, seed=1).train()
    master = model.layers["1"].mlp.experts.gate_up_proj
    MasterWeights(model)
    format_ = WeightFormat.of(fmt, 32)
    assert set_qat(model, format_, "routed-experts") > 0
    experts = model.layers["1"].mlp.experts
    fake = experts.weight_quant(experts.gate_up_proj)
    assert fake.dtype == torch.bfloat16
    assert torch.equal(fake, format_.fake_quant(master.detach()).to(torch.bfloat16))
    assert not torch.equal(fake, format_.fake_quant(master.detach().to(torch.bfloat16)))  # rounding first differs
    batch = _batch(4, cfg)
    _loss(model, batch).backward()
    assert master.grad is not None and master.grad.abs().sum() > 0


def _zero_bubble_worker(rank, world):
    """A PP 2 zero-bubble step over bf16 copies: returns (weight passes seen, most copies holding a gradient
    at one pass's end, copies still holding one after the step)."""
    import dataclasses

    from megajoy.config import load_job_config
    from megajoy.data.packing import Batch
    from megajoy.launch import setup_parallel
    from megajoy.parallel.pipeline import PipelineRunner

    job = load_job_config("tiny", None, TINY_MODEL_OVERRIDES + ["model.num_hidden_layers=4"])
    job = dataclasses.replace(job, parallel=dataclasses.replace(
        job.parallel, pipeline_model_parallel_size=2, pipeline_schedule="zero-bubble"))
    pc = setup_parallel(job)
    model = create_model(job.model, pc=pc).train()
    weights = MasterWeights(model)
    runner, holding = PipelineRunner(model, pc), []

    def after_weight_pass():
        holding.append(sum(p.grad is not None for p in model.parameters()))
        weights.flush_grads()

    runner.on_weight_grads = after_weight_pass
    ids = torch.randint(0, job.model.vocab_size, (8, 33), generator=torch.Generator().manual_seed(0))
    positions, documents = torch.arange(32).expand(2, -1), torch.zeros(2, 32, dtype=torch.long)
    batches = [Batch(ids[i:i + 2, :-1], ids[i:i + 2, 1:], torch.ones(2, 32), positions, documents)
               for i in range(0, 8, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runner.run(batches, lambda out, batch: (out.lm_loss_sum / 100, {}), False, backward=True)
    return len(holding), max(holding, default=0), [n for n, p in model.named_parameters() if p.grad is not None]


def test_zero_bubble_weight_passes_move_each_gradient_to_the_masters():
    """torch's zero-bubble weight pass adds into `.grad` itself (no accumulation hook): the pipeline runner
    hands each pass's gradients to the fp32 masters at once, so none sums over micro-batches in bf16."""
    for passes, most_holding, left in run_workers(2, _zero_bubble_worker):
        assert passes > 0 and most_holding > 0
        assert left == []


def test_master_weights_refuse_a_model_already_in_bf16():
    model = create_model(small_config(), seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"master weights must be fp32, got torch.bfloat16"):
        MasterWeights(model)


def test_params_dtype_needs_autocast():
    from megajoy.config import load_job_config

    with pytest.raises(ValueError, match="params_dtype=bf16 computes under bf16 autocast"):
        load_job_config("tiny", None, ["train.params_dtype=bf16", "train.bf16=false"])
    with pytest.raises(ValueError, match="params_dtype='fp16' must be fp32 or bf16"):
        load_job_config("tiny", None, ["train.params_dtype=fp16"])


# ---------------------------------------------------------------------------------------------- end to end
def pretrain_args(out, data_prefix, tokenizer_file, *extra, iters=4):
    base = ["pretrain", "--data-path", data_prefix, "--tokenizer", tokenizer_file, "--seq-length", "32",
            "--global-batch-size", "8", "--micro-batch-size", "2", "--train-iters", str(iters), "--log-interval",
            "1", "--eval-interval", "100", "--eval-iters", "1", "--lr-warmup-iters", "1", "--mtp-start-iter", "0",
            "--lr", "3e-3", "--out", str(out)]
    return base + [a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)] + list(extra)


def run(out, data_prefix, tokenizer_file, *extra, world=1, iters=4):
    argv = pretrain_args(out, data_prefix, tokenizer_file, *extra, iters=iters)
    if world == 1:
        assert main(argv) == 0
    else:
        run_workers(world, cli_worker, argv)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    return records, load_model_dir(latest_checkpoint(str(out)))[1]


def assert_resumes_exactly(out, data_prefix, tokenizer_file, flags, unbroken, world=1):
    """Stopped after step 2 and resumed in `out`: steps 3 and 4 and the final weights equal the unbroken
    run's (records, weights) bit for bit."""
    run(out, data_prefix, tokenizer_file, *flags, "--exit-interval", "2", world=world)
    records, weights = run(out, data_prefix, tokenizer_file, *flags, "--resume", world=world)
    ref_records, ref_weights = unbroken
    for step in (3, 4):
        assert records[step]["loss"] == ref_records[step]["loss"], step
        assert records[step]["grad_norm"] == ref_records[step]["grad_norm"], step
    for name, tensor in ref_weights.items():
        assert torch.equal(weights[name], tensor), name


def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory, data_prefix, tokenizer_file):
    return run(tmp_path_factory.mktemp("bf16_params"), data_prefix, tokenizer_file, "--params-dtype", "bf16")


@pytest.fixture(scope="module")
def bf16_noise(tmp_path_factory, data_prefix, tokenizer_file):
    """The fp32-weights run under bf16 autocast, and how far its weights land from a plain fp32 run's:
    bf16 round-off as Adam's sign-like steps amplify it, the scale differences are judged against."""
    autocast = run(tmp_path_factory.mktemp("autocast"), data_prefix, tokenizer_file, "--bf16")
    _, fp32 = run(tmp_path_factory.mktemp("fp32"), data_prefix, tokenizer_file)
    return autocast, distance(autocast[1], fp32)


def distance(weights: dict, reference: dict) -> float:
    """Relative error of all weights together (the router bias, moved by sign steps, aside)."""
    names = [n for n in reference if not n.endswith("e_score_correction_bias")]
    return relative_error(torch.cat([weights[n].flatten() for n in names]),
                          torch.cat([reference[n].flatten() for n in names]))


def test_trains_as_fp32_weights_under_autocast(bf16_reference, bf16_noise):
    """The same steps with fp32 weights under bf16 autocast: losses agree to bf16 round-off, the weights
    differ from that run's no more than bf16 noise does, and the checkpoints hold fp32 masters."""
    (records, weights), ((autocast_records, autocast), noise) = bf16_reference, bf16_noise
    assert sorted(records) == sorted(autocast_records) == [1, 2, 3, 4]
    for step in records:
        for key in ("loss", "mtp_loss"):
            want = autocast_records[step][key]
            assert abs(records[step][key] - want) <= 2e-3 * want, (step, key)
    assert records[4]["loss"] < records[1]["loss"] - 0.2  # it learns
    assert 1e-4 < noise < 3e-2
    assert distance(weights, autocast) <= 2 * noise
    assert all(t.dtype == torch.float32 for t in weights.values())
    matrix = weights["layers.0.self_attn.o_proj.weight"]
    assert not torch.equal(matrix, matrix.to(torch.bfloat16).float())  # the masters, not the bf16 copies


def test_resume_is_bit_exact(tmp_path, data_prefix, tokenizer_file, bf16_reference):
    assert_resumes_exactly(tmp_path / "resumed", data_prefix, tokenizer_file, ("--params-dtype", "bf16"),
                           bf16_reference)


def test_zero_shards_are_the_only_masters_and_resume_exactly(tmp_path, data_prefix, tokenizer_file, bf16_reference):
    """DP 2 with ZeRO-1: the fp32 shards are the only masters (whole fp32 tensors gathered only for
    checkpoints; QK-clip, which rescales heads in this run, scales the shards); a resumed run equals an
    unbroken one bit for bit, and the checkpoints hold fp32 weights."""
    flags = ("--params-dtype", "bf16", "--dp", "2", "--use-distributed-optimizer", "--qk-clip-tau", "0.03",
             "--ddp-bucket-size-mb", "0.1")  # several buckets, gathered in bf16
    records, weights = run(tmp_path / "one", data_prefix, tokenizer_file, *flags, world=2)
    assert sum(r["qk_clip_heads"] > 0 for r in records.values()) >= 2  # logits 0.03 to 0.06 in this run
    assert_resumes_exactly(tmp_path / "two", data_prefix, tokenizer_file, flags, (records, weights), world=2)
    matrix = weights["layers.0.self_attn.o_proj.weight"]
    assert not torch.equal(matrix, matrix.to(torch.bfloat16).float())  # fp32, gathered from the shards


LAYOUTS = {
    "dp2_zero": (2, ["--dp", "2", "--use-distributed-optimizer", "--ddp-bucket-size-mb", "0.1"]),  # several buckets
    "tp2_ep2_sp": (2, ["--tp", "2", "--ep", "2", "--sequence-parallel"]),
    "pp2_zero_bubble": (2, ["--pp", "2", "--pp-schedule", "zero-bubble", "--pp-layout", "1", "0", "1", "0"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_single_process(name, tmp_path, data_prefix, tokenizer_file, bf16_reference, bf16_noise):
    """To bf16 round-off: a layout sums in another order, and bf16 activations carry that difference."""
    world, flags = LAYOUTS[name]
    records, weights = run(tmp_path / name, data_prefix, tokenizer_file, "--params-dtype", "bf16", *flags, world=world)
    ref_records, ref_weights = bf16_reference
    for step in ref_records:
        assert abs(records[step]["loss"] - ref_records[step]["loss"]) <= 2e-3 * ref_records[step]["loss"], step
    assert distance(weights, ref_weights) <= 2 * bf16_noise[1]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_qat_under_zero_trains_as_one_process(optimizer, tmp_path, data_prefix, tokenizer_file, bf16_noise):
    """QAT over ZeRO-1's sharded masters (the experts' weights keep their fake-quantised values, computed
    from the fp32 masters at each gather): DP 2 trains as one process does. (Quantising the bf16 copies
    instead made the experts' weights 0.4 away from the one-process run's, relative.)"""
    flags = ("--params-dtype", "bf16", "--qat", "int4", "--qat-group", "32", "--qat-start-iter", "1",
             "--optimizer", optimizer, "--set", "model.moe_intermediate_size=32")
    ref_records, ref_weights = run(tmp_path / "one", data_prefix, tokenizer_file, *flags)
    records, weights = run(tmp_path / "dp2", data_prefix, tokenizer_file, *flags, "--dp", "2",
                           "--use-distributed-optimizer", world=2)
    for step in ref_records:
        assert abs(records[step]["loss"] - ref_records[step]["loss"]) <= 2e-3 * ref_records[step]["loss"], step
    experts = [n for n in ref_weights if ".experts." in n]
    assert experts and distance({n: weights[n] for n in experts}, {n: ref_weights[n] for n in experts}) <= 2 * bf16_noise[1]


def _fake_quant_over_the_shards(rank, world, optimizer_name):
    """DP 2, ZeRO-1, bf16 weights, int4 QAT of the routed experts. Returns (refused before any values were
    kept, kept values equal to quantising the whole fp32 masters: at first, after a step and after a
    change made in full precision, the step changed them, the share of their masters released,
    whole-weight gathers)."""
    import dataclasses

    from megajoy.config import load_job_config
    from megajoy.launch import setup_parallel
    from megajoy.parallel.optimizer import build_parallel_optimizer
    from megajoy.quant.formats import WeightFormat
    from megajoy.quant.qat import quantised_weights, set_qat

    job = load_job_config("tiny", None, TINY_MODEL_OVERRIDES + ["model.moe_intermediate_size=32",
                                                                f"optimizer.optimizer={optimizer_name}"])
    job = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, use_distributed_optimizer=True))
    pc = setup_parallel(job)
    model = create_model(job.model, pc=pc, seed=4).train()
    optimizer = build_parallel_optimizer(model, pc, job.optimizer, True)
    weights, gathers = MasterWeights(model, sharded=optimizer), []
    whole = optimizer.materialize_full_weights
    optimizer.materialize_full_weights = lambda: (gathers.append(1), whole())  # counts, then gathers
    fmt = WeightFormat.of("int4", 32)
    set_qat(model, fmt, "routed-experts")
    batch = _batch(5 + rank, job.model)
    try:
        _loss(model, batch)
        refused = False
    except RuntimeError as e:
        refused = "kept no values in this format" in str(e)
    copies = [p for _, p in quantised_weights(model, "routed-experts")]
    weights.keep_fake_quant(copies, fmt)
    master_of = {c: m for m, c in weights.compute_of.items()}
    matches, kept = [], []
    for _ in range(2):
        kept.append([fmt.fake_quant(c).clone() for c in copies])
        with weights.full_precision():
            matches.append(all(torch.equal(k, fmt.fake_quant(master_of[c]).to(torch.bfloat16))
                               for k, c in zip(kept[-1], copies)))
        _loss(model, batch).backward()
        weights.flush_grads()
        optimizer.reduce_gradients()
        optimizer.step()
    with weights.full_precision(), torch.no_grad():  # weights changed meanwhile, as a resume's load does
        for c in copies:
            master_of[c].mul_(0.5)
        optimizer.refresh_from_params()
    halved = [fmt.fake_quant(c).clone() for c in copies]
    with weights.full_precision():
        matches.append(all(torch.equal(k, fmt.fake_quant(master_of[c]).to(torch.bfloat16)) for k, c in zip(halved, copies)))
    changed = all(not torch.equal(a, b) for a, b in zip(*kept))
    released = sum(master_of[c].stride() == (0,) * c.ndim for c in copies)
    return refused, matches, changed, released / len(copies), len(gathers)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fake_quant_over_sharded_masters(optimizer):
    """QAT with ZeRO-1 keeps no whole fp32 master: each quantised bf16 weight keeps its fake-quantised
    values, computed from the fp32 masters wherever the weights are gathered (AdamW's shards, or the Muon
    matrix's owner, which broadcasts them), equal to quantising the whole master, bit for bit, and
    refreshed by each step and by changes made in full precision (a resume's load). Without kept values,
    fake quantisation is refused by name."""
    for refused, matches, changed, released, gathers in run_workers(2, _fake_quant_over_the_shards, optimizer):
        assert (refused, matches, changed, gathers) == (True, [True, True, True], True, 4)
        # AdamW: every whole master released to the shards; Muon: those of the matrices the other rank owns
        assert released == 1.0 if optimizer == "adamw" else 0 < released < 1


def _qk_clip_on_the_shards(rank, world, optimizer_name):
    """DP 2, ZeRO-1, bf16 weights: QK-clip scales the fp32 masters where they live. Returns (whole-weight
    gathers during QK-clip plus released tensors left whole, copies equal to bf16 of a whole-fp32 reference
    clipped in place, masters equal to that reference, released tensors before)."""
    import dataclasses

    from megajoy.config import load_job_config
    from megajoy.launch import setup_parallel
    from megajoy.model.mla import MLA
    from megajoy.optim.qk_clip import apply_qk_clip
    from megajoy.parallel.optimizer import build_parallel_optimizer

    job = load_job_config("tiny", None, TINY_MODEL_OVERRIDES + [f"optimizer.optimizer={optimizer_name}"])
    job = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, use_distributed_optimizer=True))
    pc = setup_parallel(job)
    model, reference = (create_model(job.model, pc=pc, seed=4).train() for _ in range(2))
    optimizer = build_parallel_optimizer(model, pc, job.optimizer, True)
    weights, gathers = MasterWeights(model, sharded=optimizer), []
    whole = optimizer.materialize_full_weights
    optimizer.materialize_full_weights = lambda: (gathers.append(1), whole())  # counts, then gathers
    tau, layers = 10.0, 0
    for net in (model, reference):
        for layers, mla in enumerate((m for m in net.modules() if isinstance(m, MLA)), 1):
            mla.max_logit.copy_(torch.tensor([tau * (1 + layers / 2), tau / 2]))  # head 0 over tau in each layer
    placeholder = lambda p: p.numel() > 1 and p.stride() == (0,) * p.ndim  # noqa: E731
    released = {n for n, p in weights.compute_of.items() if placeholder(n)}
    clip = apply_qk_clip(model, tau, pc.group("dp_cp"), lambda rows: weights.scale_rows(rows, optimizer))
    assert clip["qk_clip_heads"] == layers == 3
    apply_qk_clip(reference, tau)
    materialised = len(gathers) + sum(not placeholder(p) for p in released)
    copies = all(torch.equal(c, r.detach().to(torch.bfloat16)) for c, r in zip(model.parameters(), reference.parameters()))
    with weights.full_precision():
        masters = all(torch.equal(m, r) for m, r in zip(model.parameters(), reference.parameters()))
    return materialised, copies, masters, len(released)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_qk_clip_scales_the_shards_in_place(optimizer):
    """No whole fp32 weight is gathered for QK-clip under ZeRO-1: the rescaling lands on AdamW's fp32
    slices or on the Muon matrix's owner, and the bf16 copies and the masters then equal those of a whole
    fp32 model clipped in place, exactly."""
    for materialised, copies, masters, released in run_workers(2, _qk_clip_on_the_shards, optimizer):
        assert (materialised, copies, masters) == (0, True, True) and released > 0


MUON_CLIP = ("--params-dtype", "bf16", "--optimizer", "muon", "--qk-clip-tau", "0.03")


@pytest.fixture(scope="module")
def muon_reference(tmp_path_factory, data_prefix, tokenizer_file):
    return run(tmp_path_factory.mktemp("muon_bf16"), data_prefix, tokenizer_file, *MUON_CLIP)


def test_muon_zero_owners_hold_the_only_masters(tmp_path, data_prefix, tokenizer_file, bf16_noise, muon_reference):
    """Muon with ZeRO-1: each matrix's fp32 master lives on the rank that orthogonalises it, which
    broadcasts the new bf16 weights; QK-clip (rescaling heads here) scales the owner's rows, checkpoints see
    whole fp32 tensors. DP 2 trains as one process does, and a resumed run equals an unbroken one bit for bit."""
    ref_records, ref_weights = muon_reference
    zero = MUON_CLIP + ("--dp", "2", "--use-distributed-optimizer")
    records, weights = run(tmp_path / "dp2", data_prefix, tokenizer_file, *zero, world=2)
    assert sum(r["qk_clip_heads"] > 0 for r in records.values()) >= 2
    for step in ref_records:
        assert abs(records[step]["loss"] - ref_records[step]["loss"]) <= 2e-3 * ref_records[step]["loss"], step
    assert distance(weights, ref_weights) <= 2 * bf16_noise[1]
    assert_resumes_exactly(tmp_path / "resumed", data_prefix, tokenizer_file, zero, (records, weights), world=2)


def test_muon_zero_resumes_under_pipeline_parallelism(tmp_path, data_prefix, tokenizer_file, bf16_noise,
                                                      muon_reference):
    """PP 2 x DP 2, Muon, ZeRO-1, bf16 weights, stopped after step 2 and resumed (each stage loads only its
    own tensors' state): the same losses and weights as one uninterrupted process, to bf16 round-off."""
    flags = MUON_CLIP + ("--pp", "2", "--dp", "2", "--use-distributed-optimizer")
    run(tmp_path / "pp2", data_prefix, tokenizer_file, *flags, "--exit-interval", "2", world=4)
    records, weights = run(tmp_path / "pp2", data_prefix, tokenizer_file, *flags, "--resume", world=4)
    ref_records, ref_weights = muon_reference
    for step in ref_records:
        assert abs(records[step]["loss"] - ref_records[step]["loss"]) <= 2e-3 * ref_records[step]["loss"], step
    assert distance(weights, ref_weights) <= 2 * bf16_noise[1]


@pytest.mark.parametrize("reference", ["cached", "model"])
def test_dpo_reference_is_the_bf16_policy(reference, tmp_path, tokenizer_file):
    """The reference log-probabilities come from the same bf16 weights the policy computes with: at the
    first step policy and reference agree exactly (rewards 0, loss log 2), whichever way they are made."""
    import math

    from helpers import init_tiny_checkpoint
    from test_dpo import dpo_args

    init_tiny_checkpoint(tmp_path / "init", tokenizer_file)
    args = dpo_args(tmp_path / "init", tmp_path / "dpo", "--params-dtype", "bf16", "--reference", reference)
    args[args.index("--train-iters") + 1] = "1"
    assert main(args) == 0
    with open(tmp_path / "dpo" / "metrics.jsonl") as f:
        first = next(r for r in map(json.loads, f) if "loss" in r)
    assert first["chosen_reward"] == 0 and first["rejected_reward"] == 0 and first["reward_accuracy"] == 0
    assert abs(first["loss"] - math.log(2)) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_weights_on_gpu_track_fp32_weights_under_autocast():
    """On a GPU, with the fast paths (Triton SwiGLU, RMSNorm, RoPE, grouped GEMM): three AdamW steps over
    bf16 copies give the losses of fp32 weights under autocast, to bf16 round-off."""
    cfg = small_config(num_nextn_predict_layers=1)
    batches = [tuple(t.cuda() for t in _batch(seed, cfg, rows=4, seq=64)) for seed in range(3)]

    def losses(bf16_weights: bool) -> list[float]:
        model = create_model(cfg, device="cuda", seed=5).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        weights = MasterWeights(model) if bf16_weights else None
        out = []
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                result = model(batch[0], labels=batch[1], compute_mtp=True)
                loss = result.lm_loss + result.mtp_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if weights is not None:
                weights.copy_to_model()
            out.append(loss.item())
        return out

    for got, want in zip(losses(True), losses(False)):
        assert abs(got - want) <= 1e-2 * want, (got, want)
