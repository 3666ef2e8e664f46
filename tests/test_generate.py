"""Generation: absorbed MLA over the latent KV cache gives the full forward's logits, and greedy decoding
of a left-padded batch equals greedy decoding by full re-computation, prompt by prompt; sampling
respects temperature, top-k, top-p and stop tokens; `megajoy generate` end to end."""

import pytest
import torch
from helpers import random_model, small_config

from megajoy.model.generate import (LatentCache, SamplingParams, cached_forward, generate, greedy, sample, splitmix64,
                                    step_uniforms)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = random_model(small_config(num_nextn_predict_layers=1, initializer_range=0.1), seed=3)
    return m


def test_cached_logits_equal_the_full_forward(model):
    ids = torch.randint(0, 256, (2, 12))
    full = model(ids, compute_mtp=False).logits
    cache = LatentCache([layer.self_attn for layer in model.layers.values()], 2, 12, "cpu", torch.float32)
    positions = torch.arange(12).expand(2, 12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    prefill = cached_forward(model, ids[:, :7], positions[:, :7], valid[:, :7], cache)
    steps = [cached_forward(model, ids[:, i:i + 1], positions[:, i:i + 1], valid[:, i:i + 1], cache).logits
             for i in range(7, 12)]
    cached = torch.cat([prefill.logits] + steps, dim=1)
    assert (cached - full).abs().max() < 1e-4 * full.abs().max()
    # The cache holds the latent and the rope key only: kv_lora_rank + qk_rope_head_dim values per token.
    assert cache.c_kv[id(model.layers["0"].self_attn)].shape == (2, 12, 32)
    assert cache.k_rope[id(model.layers["0"].self_attn)].shape == (2, 12, 8)


def test_batched_greedy_equals_full_recomputation(model):
    prompts = [[5, 17, 42], [9], [200, 3, 3, 3, 7, 11, 250], [1, 2]]
    want = [greedy(model, p, 10) for p in prompts]
    got = generate(model, prompts, SamplingParams(max_new_tokens=10))
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # the prompts lead to different continuations


def test_stop_tokens_end_each_row(model):
    prompts = [[5, 17, 42], [200, 3, 3, 3, 7]]
    free = generate(model, prompts, SamplingParams(max_new_tokens=8))
    stop = free[0][2]
    got = generate(model, prompts, SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))
    assert got[0] == free[0][:3]
    cut = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert got[1] == free[1][:cut]


def test_sampling_draws_from_fp32_probabilities_of_bf16_logits():
    """bf16 weights give bf16 logits: the draw uses their fp32 softmax (the same tokens as from the
    upcast logits with the same uniforms), not bf16-rounded probabilities."""
    logits = (torch.randn(8192, 40) * 3).to(torch.bfloat16)
    params = SamplingParams(4, temperature=0.7)
    uniforms = torch.rand(8192, generator=torch.Generator().manual_seed(5))
    got = sample(logits, params, uniforms)
    assert torch.equal(got, sample(logits.float(), params, uniforms))
    rounded = torch.log((logits.float() / 0.7).softmax(-1).to(torch.bfloat16).float()) * 0.7
    assert (sample(rounded, params, uniforms) != got).sum() > 10  # bf16 probabilities would change draws


def test_splitmix64_gives_the_published_sequence():
    """SplitMix64 seeded with 1234567 (its states 1234567 + k * 0x9E3779B97F4A7C15) gives the outputs the
    Rosetta Code task lists; int64 wrapping keeps the unsigned bits."""
    states = torch.tensor([(1234567 + k * 0x9E3779B97F4A7C15) % 2 ** 64 for k in range(5)], dtype=torch.uint64)
    got = [int(x) % 2 ** 64 for x in splitmix64(states.view(torch.int64))]
    assert got == [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                   16408922859458223821]


def test_step_uniforms_are_keyed_by_row():
    """A row's uniform depends on the seed, the step and its id alone, not on the other rows or their
    order; they spread over [0, 1) evenly (every tenth holds 10% of 100,000 within 5 standard errors)."""
    params = SamplingParams(temperature=1.0, seed=7)
    whole = step_uniforms(params, 3, torch.arange(100_000))
    assert torch.equal(step_uniforms(params, 3, torch.tensor([41, 5, 99_999])), whole[[41, 5, 99_999]])
    assert not torch.equal(step_uniforms(params, 4, torch.arange(100)), whole[:100])
    assert not torch.equal(step_uniforms(SamplingParams(temperature=1.0, seed=8), 3, torch.arange(100)), whole[:100])
    assert whole.min() >= 0 and whole.max() < 1 and step_uniforms(SamplingParams(), 3, torch.arange(4)) is None
    tenths = torch.bincount((whole * 10).long(), minlength=10).double() / 100_000
    assert torch.all((tenths - 0.1).abs() <= 5 * (0.1 * 0.9 / 100_000) ** 0.5)


def test_sampled_frequencies_are_the_softmax_and_a_row_draws_alone():
    """200,000 draws of five tokens at temperature 0.5, with one step's row-keyed uniforms, land on each
    token as often as softmax(logits / 0.5) says (within 5 standard errors); a row's token is the same
    drawn alone as in its batch."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -3.0]]).repeat(200_000, 1)
    uniforms = step_uniforms(SamplingParams(temperature=0.5, seed=1), 0, torch.arange(200_000))
    drawn = sample(logits, SamplingParams(temperature=0.5), uniforms)
    want = (logits[0] / 0.5).softmax(-1)
    share = torch.bincount(drawn, minlength=5).double() / 200_000
    assert torch.all((share - want).abs() <= 5 * (want * (1 - want) / 200_000).sqrt())
    mixed = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.3, top_k=40, top_p=0.9)
    assert torch.equal(sample(mixed, params, u)[17:30], sample(mixed[17:30], params, u[17:30]))


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top_k = sample(logits, SamplingParams(temperature=1.0, top_k=2), torch.rand(4000, generator=g))
    assert set(top_k.tolist()) == {0, 1}
    share = (top_k == 0).float().mean().item()
    assert abs(share - 1 / (1 + torch.e ** -1)) < 0.03  # softmax over the two kept logits
    # top-p 0.7: p = softmax = [.64, .23, .09, ...]; the prefix reaching 0.7 is the first two tokens.
    top_p = sample(logits, SamplingParams(temperature=1.0, top_p=0.7), torch.rand(4000, generator=g))
    assert set(top_p.tolist()) == {0, 1}
    cold = sample(logits, SamplingParams(temperature=0.05), torch.rand(4000, generator=g))
    assert (cold == 0).float().mean() > 0.99
    assert sample(logits[:1], SamplingParams(), None).tolist() == [0]
    ties = torch.zeros(2000, 5)  # five equal logits: top-k keeps all of them, as transformers does
    assert len(set(sample(ties, SamplingParams(temperature=1.0, top_k=2), torch.rand(2000, generator=g)).tolist())) == 5
    # a uniform of 0 or just under 1 still lands on a token of nonzero probability
    edges = sample(logits[:2], SamplingParams(temperature=1.0, top_k=2), torch.tensor([0.0, 1 - 2 ** -24]))
    assert set(edges.tolist()) <= {0, 1}
    diverged = sample(torch.full((2, 5), float("nan")), SamplingParams(temperature=1.0), torch.tensor([0.3, 0.9]))
    assert diverged.max() < 5  # a diverged row still gives a token id inside the vocabulary


@pytest.mark.parametrize("top_k, top_p", [(2, 1.0), (7, 1.0), (7, 0.8), (0, 0.6)])
def test_sampling_draws_what_transformers_warpers_keep(top_k, top_p):
    """Temperature, top-k and top-p leave the distribution transformers' Temperature / TopK / TopP logits warpers
    leave, on bf16-rounded logits, where tokens tie at the k-th (top-k kept only k of them, whichever topk
    returned first). 40,000 evenly spaced uniforms invert the cdf: each token's share is its probability."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0], [1.5, 1.5, 1.5, 0.5, 0.5, -2.0]])
    rounded = (torch.randn(6, 24, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16).float()
    logits = torch.cat([torch.nn.functional.pad(logits, (0, 18), value=-30.0), rounded])
    n = 40_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in logits:
        want = TemperatureLogitsWarper(0.7)(None, row[None].clone())
        want = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, want) if top_k else want)
        want = want.softmax(-1)[0].double()
        drawn = sample(row.expand(n, -1), SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p), uniforms)
        assert (torch.bincount(drawn, minlength=24).double() / n - want).abs().max() < 1e-4


def test_generation_needs_the_whole_model_and_prompts(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []])


@pytest.mark.parametrize("decode", ["generate", "speculative"])
def test_bad_prompts_get_one_clear_error(model, decode):
    """Empty prompts, prompts that with max_new_tokens outrun the context and unknown token ids are refused by
    name (one process raised an IndexError for an unknown id; a tensor-parallel group, whose embedding reads it
    as zeros, decoded it silently; a prompt one token short of the context decoded max_new_tokens past it on
    positions the model never saw, where transformers warns and vLLM refuses); a prompt that with its new
    tokens fills the context exactly decodes as the full forward does."""
    from megajoy.model.generate import speculative_greedy

    def run(prompt):
        if decode == "generate":
            return generate(model, [[1, 2], prompt], SamplingParams(max_new_tokens=3))[1]
        return speculative_greedy(model, prompt, 3, 2)[0]

    context = model.cfg.max_position_embeddings
    edge, over, longer = ([t % 256 for t in range(n)] for n in (context - 3, context - 2, context + 1))
    too_long = "tokens: with max_new_tokens = 3 that is {}, more than the model's context"
    for prompt, message in [([], "prompt .* is empty"), ([5, 256, 7], "token id 256, outside the model's vocabulary"),
                            ([5, -1], "token id -1, outside"),
                            (over, f"{context - 2} " + too_long.format(context + 1)),
                            (longer, f"{context + 1} " + too_long.format(context + 4))]:
        with pytest.raises(ValueError, match=message):
            run(prompt)
    assert run(edge) == greedy(model, edge, 3)


@pytest.mark.parametrize("temperature", [-0.5, float("nan")])
def test_temperature_must_be_a_number_at_least_zero(model, temperature):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=2, temperature=temperature))


EP_PROMPTS = ([[5, 17, 42], [9, 9]], [[200, 3, 3, 3, 7, 11, 250]])  # rank 0's two rows, rank 1's one


def _layout_model(flags):
    """The module's model, on this rank of a layout (`flags`: ParallelConfig fields), and its config."""
    import dataclasses

    from helpers import TINY_MODEL_OVERRIDES
    from megajoy.config import load_job_config
    from megajoy.launch import setup_parallel
    from megajoy.model import create_model

    job = load_job_config("tiny", None, TINY_MODEL_OVERRIDES)
    cfg = small_config(num_nextn_predict_layers=1, initializer_range=0.1)
    job = dataclasses.replace(job, model=cfg, parallel=dataclasses.replace(job.parallel, **flags))
    pc = setup_parallel(job)
    model = create_model(cfg, pc=pc, seed=3)  # every layout draws the same weights
    whole = dict(random_model(cfg, seed=3).named_buffers())
    with torch.no_grad():  # random_model's router bias (replicated: each rank holds its layers' whole)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(whole[name])
    return model.eval(), cfg


def _first_moe_forwards(model, cfg) -> list:
    """A list that grows by one at every forward of this rank's first MoE block."""
    forwards = []
    moe_layers = [layer for i, layer in model.layers.items() if cfg.is_moe_layer(int(i))]  # this rank's
    if moe_layers:
        moe_layers[0].mlp.register_forward_hook(lambda *_: forwards.append(1))
    return forwards


def _layout_generate_worker(rank, world, flags, prompts_by_rank, params):
    """generate() on one rank of a two-rank layout with its own prompts; how many forwards its first MoE
    block ran; whether sequence parallelism is back on after it (where it was on)."""
    model, cfg = _layout_model(flags)
    forwards = _first_moe_forwards(model, cfg)
    sequence_parallel = [m for m in model.modules() if getattr(m, "sp", False)]
    out = generate(model, prompts_by_rank[rank], params)
    restored = model.pc.sequence_parallel and len(sequence_parallel) > 0 and all(m.sp for m in sequence_parallel)
    return out, len(forwards), restored


def test_expert_parallel_ranks_decode_their_own_prompts_in_lockstep(model):
    """Two expert-parallel ranks, each with half the experts and its own prompts, decode what one process
    with the whole model decodes for them, although one rank's rows stop long before the other's: the
    finished rank keeps stepping (each MoE layer's all-to-all needs both) until both are done."""
    from megajoy.parallel.spawn import run_workers

    free = [generate(model, prompts, SamplingParams(max_new_tokens=10)) for prompts in EP_PROMPTS]
    stops = (free[0][0][1], free[0][1][1])  # rank 0's rows stop at their second token, rank 1's row never
    params = SamplingParams(max_new_tokens=10, stop_token_ids=stops)
    want = [generate(model, prompts, params) for prompts in EP_PROMPTS]
    assert [len(row) for rows in want for row in rows] == [2, 2, 10]
    results = run_workers(2, _layout_generate_worker, dict(expert_model_parallel_size=2), EP_PROMPTS, params,
                          timeout=120)
    assert [out for out, _, _ in results] == want
    assert [forwards for _, forwards, _ in results] == [10, 10]  # a prefill and nine steps on both ranks


def test_shares_of_a_prompt_set_sample_what_the_whole_set_samples(model):
    """Prompts shared out (as among data-parallel ranks) with their indices in the set as row ids draw
    the completions one batch of the whole set draws; ids of 0, 1, ... (the default) draw others."""
    prompts = [[5, 17, 42], [9, 9], [7], [200, 3, 3, 3, 7, 11, 250], [4, 4]]
    params = SamplingParams(max_new_tokens=8, temperature=1.5, seed=11)
    whole = generate(model, prompts, params)
    assert generate(model, prompts[1::2], params, row_ids=[1, 3]) == whole[1::2]
    assert generate(model, prompts[::-2], params, row_ids=[4, 2, 0]) == whole[::-2]
    assert generate(model, prompts[1::2], params) != whole[1::2]
    with pytest.raises(ValueError, match="2 row ids for 3 prompts"):
        generate(model, prompts[:3], params, row_ids=[0, 1])


@pytest.mark.parametrize("flags", [dict(tensor_model_parallel_size=2),
                                   dict(tensor_model_parallel_size=2, sequence_parallel=True),
                                   dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                        expert_model_parallel_size=2)], ids=["tp2", "tp2_sp", "tp2_sp_ep2"])
def test_tensor_parallel_ranks_decode_as_one_process(model, flags):
    """A tensor-parallel pair (each rank half the heads, half of every MLP and half the vocabulary; with
    sequence parallelism, off while decoding and back on after; with the experts split between the same
    two ranks) samples the same tokens as one process with the whole model, greedy and at temperature
    0.8 with top-k, from a left-padded batch whose prefill (7 positions) the two ranks do not divide."""
    from megajoy.parallel.spawn import run_workers

    prompts = [[5, 17, 42], [9], [200, 3, 3, 3, 7, 11, 250]]
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, seed=5)
    for params in (SamplingParams(max_new_tokens=8), sampled):
        want = generate(model, prompts, params)
        results = run_workers(2, _layout_generate_worker, flags, [prompts, prompts], params, timeout=120)
        assert [out for out, _, _ in results] == [want, want]
        assert all(restored for _, _, restored in results) == flags.get("sequence_parallel", False)


FIVE_PROMPTS = ([[5, 17, 42], [9], [200, 3, 7], [11, 12, 13, 14], [60, 61]],)
PP = dict(pipeline_model_parallel_size=2)


@pytest.mark.parametrize("flags, by_pipeline", [
    (PP, FIVE_PROMPTS),
    (PP, ([[5, 17, 42]],)),
    (dict(PP, pipeline_schedule="interleaved", pipeline_layout=[1, 0, 1, 1]), FIVE_PROMPTS),
    (dict(PP, pipeline_schedule="zero-bubble", pipeline_layout=[1, 1, 0, 1]), FIVE_PROMPTS),
    (dict(PP, expert_model_parallel_size=2), ([[5, 17, 42], [9, 9], [7]], [[200, 3, 3, 3, 7, 11, 250], [4, 4]])),
    (dict(PP, expert_model_parallel_size=2), EP_PROMPTS),
    (dict(PP, tensor_model_parallel_size=2, sequence_parallel=True), FIVE_PROMPTS)],
    ids=["pp2", "pp2_one_row", "pp2_interleaved", "pp2_zero_bubble", "pp2_ep2", "pp2_ep2_one_row", "pp2_tp2_sp"])
def test_pipeline_ranks_decode_as_one_process(model, flags, by_pipeline):
    """A pipeline (each rank its stages' layers and latent caches; the embedding on the first stage, the
    head on the last, which samples and sends the tokens back to the first) decodes what one process
    decodes, greedy and sampled, with rows stopping at different steps. The rows go round in as many
    groups as stages, each stage stepping another group at once (one group where a pipeline, or an
    expert-parallel peer's, has fewer rows than stages): the first MoE layer steps more than one group.
    Layouts: two stages of 2 + 1 layers; interleaved and ZB-V placements of four stages, one of them
    empty (ZB-V's last stage on the first rank); two pipelines of expert-parallel pairs, each with its own
    prompts; two stages of tensor-parallel pairs with sequence parallelism."""
    from megajoy.parallel.spawn import run_workers

    world = 4 if flags.get("expert_model_parallel_size", 1) > 1 or flags.get("tensor_model_parallel_size", 1) > 1 else 2
    stop = generate(model, by_pipeline[0], SamplingParams(max_new_tokens=8))[0][2]
    greedy_params = SamplingParams(max_new_tokens=8, stop_token_ids=(stop,))
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, seed=5, stop_token_ids=(stop,))
    tp = flags.get("tensor_model_parallel_size", 1)
    # every rank's prompts: its pipeline's (ranks are TP fastest, then DP, then PP)
    prompts_by_rank = [by_pipeline[(rank // tp) % len(by_pipeline)] for rank in range(world)]
    for params in (greedy_params, sampled):
        want = [generate(model, prompts, params) for prompts in by_pipeline]
        results = run_workers(world, _layout_generate_worker, flags, prompts_by_rank, params, timeout=120)
        assert [out for out, _, _ in results] == [want[(rank // tp) % len(want)] for rank in range(world)]
        lengths = [len(row) for rows in want for row in rows]
        if params is greedy_params:  # the first row stopped at its third token, others (if any) ran on
            assert lengths[0] == 3 and (len(lengths) == 1 or max(lengths) == 8)
        stages = 4 if "pipeline_layout" in flags else 2
        one_group = min(len(prompts) for prompts in by_pipeline) < stages
        assert (max(forwards for _, forwards, _ in results) <= 8) == one_group


class OracleDrafter:
    """Drafts the true greedy continuation, wrong from draft `wrong_at` on (exercises acceptance)."""

    def __init__(self, continuation: list[int], wrong_at: int):
        self.continuation, self.wrong_at, self.done = continuation, wrong_at, 0

    def confirm(self, hidden, next_ids):
        self.done += next_ids.shape[1]

    def draft(self, k):
        start = self.done - self.prompt_length
        drafts = self.continuation[start:start + k] + [0] * k
        return [t if i < self.wrong_at else (t + 1) % 256 for i, t in enumerate(drafts[:k])]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_mtp_speculative_greedy_equals_plain_greedy(model, k):
    from megajoy.model.generate import speculative_greedy

    for prompt in ([5, 17, 42], [200, 3, 3, 3, 7, 11, 250]):
        want = greedy(model, prompt, 12)
        got, stats = speculative_greedy(model, prompt, 12, k)
        assert got == want and stats.verify_passes >= 1 and stats.drafted == k * stats.verify_passes


@pytest.mark.parametrize("wrong_at", [0, 1, 3, 99])
def test_verification_keeps_exactly_the_agreeing_drafts(model, wrong_at):
    from megajoy.model.generate import speculative_greedy

    prompt, k = [9, 8, 7], 3
    want = greedy(model, prompt, 13)
    drafter = OracleDrafter(want[1:], wrong_at)
    drafter.prompt_length = len(prompt)
    got, stats = speculative_greedy(model, prompt, 13, k, drafter=drafter)
    assert got == want
    per_pass = min(wrong_at, k)
    assert stats.accepted == per_pass * stats.verify_passes
    assert stats.verify_passes == -(-12 // (per_pass + 1))  # 12 tokens after the prefill's first


def test_speculative_decoding_stops_at_an_accepted_stop_token(model):
    """A stop token accepted among a pass's drafts ends decoding there, as it ends greedy decoding; the
    statistics count that one pass, not passes up to max_new_tokens."""
    from megajoy.model.generate import speculative_greedy

    prompt, k = [9, 8, 7], 3
    free = greedy(model, prompt, 40)
    stop = free[2]  # drafted (and accepted) in the first verification pass
    want = greedy(model, prompt, 40, eos_token_id=stop)
    drafter = OracleDrafter(free[1:], 99)
    drafter.prompt_length = len(prompt)
    got, stats = speculative_greedy(model, prompt, 40, k, stop_token_ids=(stop,), drafter=drafter)
    assert got == want == free[:free.index(stop) + 1]
    assert stats.verify_passes == 1 and stats.accepted == k


def _recorded_drafts(generate_module) -> list:
    """A list that receives every draft the MTP drafter makes from now on."""
    drafts, draft = [], generate_module.MtpDrafter.draft

    def recorded(self, k):
        drafts.append(draft(self, k))
        return drafts[-1]

    generate_module.MtpDrafter.draft = recorded
    return drafts


def _layout_speculative_worker(rank, world, flags, prompts_by_rank, k, stops):
    """speculative_decode() on one rank of a two-rank layout with its own prompts: the tokens, (verification
    passes, accepted drafts) per prompt, every draft, and how many forwards this rank's first MoE block ran."""
    import megajoy.model.generate as generate_module

    model, cfg = _layout_model(flags)
    forwards, drafts = _first_moe_forwards(model, cfg), _recorded_drafts(generate_module)
    decoded = generate_module.speculative_decode(model, prompts_by_rank[rank], 10, k, stops)
    return [tokens for tokens, _ in decoded], [(s.verify_passes, s.accepted) for _, s in decoded], drafts, len(forwards)


@pytest.mark.parametrize("flags, own_prompts", [
    (dict(tensor_model_parallel_size=2, sequence_parallel=True), False),
    (dict(expert_model_parallel_size=2), True),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2), False)],
    ids=["tp2_sp", "ep2", "tp2_sp_ep2"])
def test_speculative_decoding_under_tensor_and_expert_parallelism(model, flags, own_prompts, monkeypatch):
    """MTP-drafted speculative decoding on a tensor-parallel pair (the drafts are argmaxes over the whole
    vocabulary, of which each rank's head holds half) decodes, drafts and accepts what one process does;
    so do two expert-parallel ranks decoding their own prompts, rank 0 two and rank 1 one that stops at its
    second token: the MoE blocks of both run as many forwards as the busier rank's passes (a prefill and
    the verification passes of each prompt), the other's placeholders included."""
    import megajoy.model.generate as generate_module
    from megajoy.parallel.spawn import run_workers

    by_rank = EP_PROMPTS if own_prompts else (EP_PROMPTS[0], EP_PROMPTS[0])
    stops = (greedy(model, EP_PROMPTS[1][0], 10)[1],)
    want, want_drafts, draft = [], [], generate_module.MtpDrafter.draft
    for prompts in by_rank:
        monkeypatch.setattr(generate_module.MtpDrafter, "draft", draft)  # the unrecorded one again after the test
        want_drafts.append(_recorded_drafts(generate_module))
        want.append([generate_module.speculative_greedy(model, p, 10, 2, stops) for p in prompts])
    passes = [sum(1 + stats.verify_passes for _, stats in rank_want) for rank_want in want]
    if own_prompts:
        assert passes[1] < passes[0]
    results = run_workers(2, _layout_speculative_worker, flags, by_rank, 2, stops, timeout=120)
    for (tokens, stats, drafts, forwards), rank_want, rank_drafts in zip(results, want, want_drafts):
        assert tokens == [t for t, _ in rank_want]
        assert stats == [(s.verify_passes, s.accepted) for _, s in rank_want]
        assert drafts == rank_drafts and len(drafts) == sum(s.verify_passes for _, s in rank_want)
        assert forwards == max(passes)


def test_generate_command(tmp_path, tokenizer_file, capsys):
    import json

    from helpers import init_tiny_checkpoint
    from megajoy.cli import main
    from megajoy.commands.generate import load_for_generation, prompt_ids

    init_tiny_checkpoint(tmp_path / "m", tokenizer_file, "model.num_nextn_predict_layers=1",
                         "model.initializer_range=0.2")
    capsys.readouterr()
    model, tokenizer = load_for_generation(str(tmp_path / "m"))
    outputs = {}
    for flags in ([], ["--mtp-draft", "2"]):
        assert main(["generate", "--ckpt", str(tmp_path / "m"), "--prompt", "the cat", "--prompt", "a dog sat",
                     "--max-new-tokens", "6", "--stop", "<｜end▁of▁sentence｜>", "--json"] + flags) == 0
        outputs[bool(flags)] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for text, plain, speculative in zip(["the cat", "a dog sat"], outputs[False], outputs[True]):
        want = greedy(model, prompt_ids(tokenizer, text, False, False), 6, tokenizer.tok.token_to_id("<｜end▁of▁sentence｜>"))
        assert plain["token_ids"] == want == speculative["token_ids"]
        assert plain["completion"] == tokenizer.decode(want) and 0 <= speculative["acceptance_rate"] <= 1
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt", str(tmp_path / "m")])  # --prompt is required
    assert main(["generate", "--ckpt", str(tmp_path / "m"), "--prompt", "x", "--stop", "the cat"]) == 2
    assert "a stop must be exactly one token" in capsys.readouterr().err
    # --thinking without --chat decoded a plain continuation, no <think> anywhere
    assert main(["generate", "--ckpt", str(tmp_path / "m"), "--prompt", "x", "--thinking"]) == 2
    assert "--thinking opens the chat template's answer with <think>: it needs --chat" in capsys.readouterr().err
    # --top-k / --top-p at the default temperature 0 were silently unused: greedy decoding ignores them
    assert main(["generate", "--ckpt", str(tmp_path / "m"), "--prompt", "x", "--top-p", "0.9"]) == 2
    assert "--temperature 0 decodes greedily: set --temperature above 0" in capsys.readouterr().err


def test_generate_command_in_bf16_decodes_as_transformers_in_bf16(tmp_path, tokenizer_file, capsys):
    """`megajoy generate --bf16` keeps bf16 weights (so a bf16 latent cache), and greedily decodes what
    transformers' DeepseekV3ForCausalLM decodes from the same weights loaded in bf16."""
    import json

    from helpers import hf_reference, init_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    from megajoy.cli import main
    from megajoy.commands.generate import load_for_generation, prompt_ids

    init_tiny_checkpoint(tmp_path / "m", tokenizer_file, "model.initializer_range=0.2")
    model, tokenizer = load_for_generation(str(tmp_path / "m"), bf16=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    texts = ["the cat", "a dog sat on the mat"]
    capsys.readouterr()
    argv = ["generate", "--ckpt", str(tmp_path / "m"), "--max-new-tokens", "8", "--json", "--bf16"]
    assert main(argv + [a for t in texts for a in ("--prompt", t)]) == 0
    got = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    hf_reference(load_for_generation(str(tmp_path / "m"))[0], str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.bfloat16).eval()
    eos = tokenizer.tok.token_to_id("<｜end▁of▁sentence｜>")
    for text, tokens in zip(texts, got):
        ids = torch.tensor([prompt_ids(tokenizer, text, False, False)])
        want = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        assert tokens == want[0, ids.shape[1]:].tolist() and len(tokens) == 8


def _cli_stdout(rank, world, argv):
    """`megajoy ARGV` on one rank; what it printed."""
    import contextlib
    import io

    from megajoy.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


@pytest.mark.parametrize("world, layout, decoding", [
    (2, ["--dp", "2"], ["--temperature", "1.2", "--seed", "3"]), (2, ["--tp", "2"], []),
    (4, ["--pp", "2", "--ep", "2"], ["--temperature", "1.2", "--seed", "3"]), (2, ["--dp", "2"], ["--mtp-draft", "2"]),
    (2, ["--tp", "2"], ["--mtp-draft", "2"]), (2, ["--ep", "2"], ["--mtp-draft", "2"])],
    ids=["dp2_sampled", "tp2", "pp2_ep2_dp2_sampled", "dp2_mtp_draft", "tp2_mtp_draft", "ep2_dp2_mtp_draft"])
def test_generate_command_under_a_layout_prints_the_one_process_output(tmp_path_factory, tokenizer_file, world,
                                                                        layout, decoding):
    """`megajoy generate` on several ranks (each loading its share of a model directory's weights):
    data-parallel ranks decode shares of the five prompts (3 and 2), tensor-parallel and pipeline ranks
    decode together, and rank 0 alone prints every completion in the prompts' order, the one process's,
    sampled ones too (keyed by the prompt's index, not its place in a rank's share)."""
    from helpers import init_tiny_checkpoint
    from megajoy.parallel.spawn import run_workers

    ckpt = tmp_path_factory.mktemp("generate_layout")
    init_tiny_checkpoint(ckpt, tokenizer_file, "model.num_nextn_predict_layers=1", "model.initializer_range=0.2")
    argv = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "6", "--json", *decoding]
    for text in ("the cat", "a dog sat", "on the", "mat and", "the end"):
        argv += ["--prompt", text]
    want = _cli_stdout(0, 1, argv)
    assert len(want.splitlines()) == 5
    printed = run_workers(world, _cli_stdout, argv + layout, timeout=120)
    assert printed[0] == want and not any(printed[1:])


def test_speculative_decoding_refuses_a_split_model(tmp_path, tokenizer_file, capfd):
    from helpers import init_tiny_checkpoint
    from megajoy.parallel.spawn import cli_worker, run_workers

    init_tiny_checkpoint(tmp_path, tokenizer_file, "model.num_nextn_predict_layers=1")
    with pytest.raises(AssertionError, match="megajoy exited with 2"):
        run_workers(2, cli_worker, ["generate", "--ckpt", str(tmp_path), "--prompt", "the cat", "--mtp-draft", "2",
                                    "--pp", "2"], timeout=120)
    assert "speculative decoding runs under data, tensor and expert parallelism, not pipeline" in capfd.readouterr().err


def test_generate_command_refuses_a_prompt_past_the_context_on_every_rank(tmp_path, tokenizer_file, capfd):
    """A prompt that with --max-new-tokens outruns max_position_embeddings is refused by its place on the
    command line, on every data-parallel rank (only the rank whose share held it refused it, as its share's
    prompt 0, while the other decoded on)."""
    from helpers import init_tiny_checkpoint
    from megajoy.commands.generate import load_for_generation, prompt_ids
    from megajoy.parallel.spawn import cli_worker, run_workers

    init_tiny_checkpoint(tmp_path, tokenizer_file, "model.max_position_embeddings=16")
    tokenizer = load_for_generation(str(tmp_path))[1]
    texts = ["the", "the cat sat on the mat"]
    lengths = [len(prompt_ids(tokenizer, t, False, False)) for t in texts]
    assert lengths[0] + 10 <= 16 < lengths[1] + 10
    capfd.readouterr()
    argv = ["generate", "--ckpt", str(tmp_path), "--prompt", texts[0], "--prompt", texts[1], "--max-new-tokens", "10"]
    with pytest.raises(AssertionError, match="megajoy exited with 2"):
        run_workers(2, cli_worker, argv + ["--dp", "2"], timeout=120)
    err = capfd.readouterr().err
    refusal = f"prompt 1 has {lengths[1]} tokens: with max_new_tokens = 10 that is {lengths[1] + 10}, more than"
    assert err.count(refusal) == 2 and "prompt 0" not in err
