"""Generation. `generate` decodes batches of prompts with absorbed MLA over a latent KV cache: per token
and layer the cache holds only the normalised latent c_kv (kv_lora_rank values) and the rotated shared
rope key (qk_rope_head_dim values), and kv_b_proj is folded into the query and the output instead of
expanding keys and values per head:

    score(i, t) = scale * (q_nope_i W_uk . c_t + q_rope_i . k_rope_t),    out_i = (sum_t p(i, t) c_t) W_uv^T

`greedy` re-runs the full forward for every token (no cache): the reference the cached path and the
exports are checked against. One rank holds the whole model, or its tensor-parallel share (the ranks of
a tensor-parallel group decode the same prompts, each with its heads and its slice of the vocabulary;
with sequence parallelism switched off while decoding, as a step has one position), or under expert
parallelism all but the other ranks' experts: the ranks of an expert-parallel group decode their own
prompts in lockstep (every MoE layer exchanges tokens with all of them) until all their rows are done.
Under pipeline parallelism the ranks of a pipeline decode together, the rows in groups that go round the
stages at once (megajoy.model.pipelined_decoding).
Legend: B batch, S new positions, T cached positions, H heads, C kv_lora_rank, R rope dim, N nope dim,
V value dim.
"""

import contextlib
import itertools
from dataclasses import dataclass

import torch

from megajoy.kernels.rope import apply_rope


@torch.no_grad()
def greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The tokens greedy decoding appends to `prompt` (stopping after `eos_token_id` if given)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt)
    try:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=device), compute_mtp=False).logits
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == eos_token_id:
                break
    finally:
        model.train(was_training)
    return ids[len(prompt):]


# ------------------------------------------------------------------------------------------ the cache

class LatentCache:
    """Per attention layer: c_kv [B, T, C] and rotated k_rope [B, T, R], the first `length` positions
    filled. Rows are left-padded: `valid` [B, T] marks the positions that hold real tokens."""

    def __init__(self, layers: list, batch: int, capacity: int, device, dtype):
        self.c_kv = {id(m): torch.zeros(batch, capacity, m.kv_lora_rank, device=device, dtype=dtype) for m in layers}
        self.k_rope = {id(m): torch.zeros(batch, capacity, m.rope_dim, device=device, dtype=dtype) for m in layers}
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0

    @classmethod
    def of_model(cls, model, batch: int, capacity: int) -> "LatentCache":
        """A cache for the rank's decoder layers of the main model, on its device and in its dtype."""
        p = next(model.parameters())
        return cls([layer.self_attn for layer in model.layers.values()], batch, capacity, p.device, p.dtype)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def write(self, mla, c_kv_BSC: torch.Tensor, k_rope_BSR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's latents at [length, length + S) and return the filled cache of the layer."""
        end = self.length + c_kv_BSC.shape[1]
        self.c_kv[id(mla)][:, self.length:end] = c_kv_BSC
        self.k_rope[id(mla)][:, self.length:end] = k_rope_BSR
        return self.c_kv[id(mla)][:, :end], self.k_rope[id(mla)][:, :end]

    def step_mask(self, new_valid_BS: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, T] for the S positions about to be written: each sees the valid positions up to
        itself, and itself (so a padding position's output stays finite; no valid one looks at it)."""
        s = new_valid_BS.shape[1]
        end = self.length + s
        self.valid[:, self.length:end] = new_valid_BS
        causal = torch.ones(s, end, dtype=torch.bool, device=self.valid.device).tril(self.length)
        keys, queries = torch.arange(end, device=self.valid.device), torch.arange(s, device=self.valid.device)
        itself = keys[None, :] == self.length + queries[:, None]
        return ((causal.unsqueeze(0) & self.valid[:, None, :end]) | itself.unsqueeze(0)).unsqueeze(1)

    def advance(self, s: int) -> None:
        self.length += s

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (rejected speculative tokens)."""
        self.valid[:, length:] = False
        self.length = length


def absorbed_attention(mla, x_BSD: torch.Tensor, cos, sin, cache: LatentCache, mask_B1ST: torch.Tensor):
    q_BSHN, q_rope_BSHR = mla.project_q(x_BSD).split([mla.nope_dim, mla.rope_dim], dim=-1)
    c_kv_BSC, k_rope_BSR = mla.project_latent(x_BSD)
    q_rope_BSHR = apply_rope(q_rope_BSHR, cos, sin)
    k_rope_BSR = apply_rope(k_rope_BSR.unsqueeze(2), cos, sin).squeeze(2)
    c_kv_BTC, k_rope_BTR = cache.write(mla, c_kv_BSC, k_rope_BSR)

    w_HXC = mla.kv_b_proj.effective_weight().view(mla.num_heads, mla.nope_dim + mla.v_dim, mla.kv_lora_rank)
    w_uk_HNC, w_uv_HVC = w_HXC.split([mla.nope_dim, mla.v_dim], dim=1)
    q_latent_BSHC = torch.einsum("bshn,hnc->bshc", q_BSHN, w_uk_HNC)
    scores_BHST = (torch.einsum("bshc,btc->bhst", q_latent_BSHC, c_kv_BTC)
                   + torch.einsum("bshr,btr->bhst", q_rope_BSHR, k_rope_BTR)) * mla.softmax_scale
    probs_BHST = scores_BHST.float().masked_fill(~mask_B1ST, float("-inf")).softmax(-1).to(c_kv_BTC.dtype)
    out_latent_BSHC = torch.einsum("bhst,btc->bshc", probs_BHST, c_kv_BTC)
    out_BSHV = torch.einsum("bshc,hvc->bshv", out_latent_BSHC, w_uv_HVC)
    return mla.o_proj.forward_exit(out_BSHV.flatten(2), False)


def decoder_step(layer, h_BSD, cos, sin, cache, mask):
    h_BSD = h_BSD + absorbed_attention(layer.self_attn, layer.input_layernorm(h_BSD), cos, sin, cache, mask)
    return h_BSD + layer.mlp(layer.post_attention_layernorm(h_BSD))


def check_generation_layout(model) -> None:
    if model.pc.size("cp") > 1:
        raise ValueError("generation runs under data, tensor, expert and pipeline parallelism, not context "
                         "parallelism (a decoding step has one position)")


@contextlib.contextmanager
def whole_sequences(model):
    """Sequence parallelism off inside: every tensor-parallel rank holds the whole sequence, and the
    layers' tensor-parallel regions all-reduce it instead of gathering and scattering its shards."""
    modules = [m for m in model.modules() if getattr(m, "sp", False)]
    sequence_parallel = model.pc.sequence_parallel
    for m in modules:
        m.sp = False
    model.pc.sequence_parallel = False
    try:
        yield
    finally:
        for m in modules:
            m.sp = True
        model.pc.sequence_parallel = sequence_parallel


def all_done(done_B: torch.Tensor, model) -> bool:
    """Whether every row is done here and, under expert parallelism, on every rank of the group."""
    if model.pc.ep_size == 1:
        return bool(done_B.all())
    import torch.distributed as dist

    busy = (~done_B).any().float().reshape(1)
    dist.all_reduce(busy, op=dist.ReduceOp.MAX, group=model.pc.group("ep"))
    return not bool(busy.item())


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, S, vocab] fp32
    hidden: torch.Tensor  # [B, S, D], the final normed hidden state (the MTP module's input)


def stage_forward(model, spec, x, rope, cache: LatentCache, mask_B1ST: torch.Tensor, last_only: bool = False):
    """One pipeline stage's part of a cached step over the positions `mask_B1ST` was made for: the first
    stage embeds token ids, every stage runs its layers over the cache, and the last applies the final
    norm and the head (a StepOutput; of the last position only with `last_only`); the others return
    their hidden states."""
    h = model.embed(x) if spec.is_first else x
    for i in spec.layers:
        h = decoder_step(model.layers[str(i)], h, rope.cos, rope.sin, cache, mask_B1ST)
    if not spec.is_last:
        return h
    hidden = model.norm(h[:, -1:] if last_only else h)
    return StepOutput(model.full_logits(model.head(hidden)).float(), hidden)


def cached_forward(model, ids_BS: torch.Tensor, positions_BS: torch.Tensor, valid_BS: torch.Tensor,
                   cache: LatentCache, last_only: bool = False) -> StepOutput:
    """Run S new positions through a model held in one stage, reading and extending the cache; with
    `last_only`, logits and hidden state of the last position only (a prefill that only samples the next
    token)."""
    mask = cache.step_mask(valid_BS)
    out = stage_forward(model, model.stages[0], ids_BS, model.sequence_info(positions_BS, None), cache, mask,
                        last_only)
    cache.advance(ids_BS.shape[1])
    return out


# ------------------------------------------------------------------------------------------ sampling

@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop_token_ids: tuple = ()
    seed: int = 0


def sample(logits_BV: torch.Tensor, params: SamplingParams, uniforms_B: torch.Tensor | None) -> torch.Tensor:
    """Next token ids [B]: argmax at temperature 0, else a draw after temperature, top-k and top-p, from
    fp32 probabilities whatever the logits' dtype (bf16 weights give bf16 logits). Each row's draw inverts
    its cumulative distribution at its own uniform number in [0, 1) (`step_uniforms`), so a row's token
    does not depend on the other rows of its batch."""
    return _choose(_tempered(logits_BV, params.temperature), params, uniforms_B)


def _tempered(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits at the sampling temperature (as they are when greedy)."""
    logits = logits_BV.float()
    return logits / temperature if temperature > 0 else logits


def _choose(logits: torch.Tensor, params: SamplingParams, uniforms_B: torch.Tensor | None) -> torch.Tensor:
    """The next tokens from tempered fp32 logits: the argmax when greedy, else a draw."""
    return logits.argmax(-1) if params.temperature <= 0 else _draw(logits, params, uniforms_B)


def _draw(logits: torch.Tensor, params: SamplingParams, uniforms_B: torch.Tensor) -> torch.Tensor:
    """A draw from tempered fp32 logits after top-k and top-p (see sample)."""
    if params.top_k:
        # Tokens tied with the k-th stay, as transformers' TopKLogitsWarper keeps them: exactly k would keep
        # whichever tied tokens topk happens to return (bf16 logits tie at the k-th in most steps).
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # float64: a GPU's parallel scan stays monotone over tokens of probability 0, and small tails count
    cdf = logits.softmax(-1).double().cumsum(-1)
    # the first token whose cumulative probability reaches a point in (0, total]: never one of probability 0
    point = (1 - uniforms_B.to(cdf.device, cdf.dtype)) * cdf[:, -1]
    # (non-finite logits, whose cdf is NaN, would give an id past the vocabulary: keep it inside)
    return torch.searchsorted(cdf, point[:, None]).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def step_uniforms(params: SamplingParams, step: int, row_ids_B: torch.Tensor) -> torch.Tensor | None:
    """The uniform numbers in [0, 1) that decoding step `step` samples with, one per row, keyed by the seed,
    the step and the row's id alone (a counter-based generator, SplitMix64): a row draws the same however
    the rows are grouped, split among ranks or ordered. None when greedy."""
    if params.temperature <= 0:
        return None
    # one stream per (seed, step), whose r-th output row r draws; the scalar on the CPU (no device launches)
    stream = int(splitmix64(splitmix64(torch.tensor(params.seed, dtype=torch.long)) + step))
    bits = splitmix64(row_ids_B.long() * _signed(_GOLDEN) + stream)
    return _shift_right(bits, 11).double() / 2 ** 53  # the top 53 bits: exact in float64


_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(state: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output for int64 `state` (its next state is state + golden ratio). int64 arithmetic wraps
    modulo 2^64, so the bits are those of the unsigned algorithm."""
    z = state + _signed(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shift_right(z, 31)


def _signed(u: int) -> int:
    """An unsigned 64-bit constant as the int64 with its bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """The logical shift (int64's >> copies the sign bit in)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def sample_step(logits_BV: torch.Tensor, params: SamplingParams, uniforms_B: torch.Tensor | None,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(next token ids [B], the entropy there [B] of the policy at the sampling temperature (1 when greedy),
    or None)."""
    logits = _tempered(logits_BV, params.temperature)  # once, for the entropy and the draw
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1) if with_entropy else None
    return _choose(logits, params, uniforms_B), entropy


def left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, valid, positions) [B, longest] of left-padded prompts: every row's last token at the same index."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    valid = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(p, device=device)
        valid[b, longest - len(p):] = True
    return ids, valid, (valid.long().cumsum(1) - 1).clamp(min=0)


def check_sampling(params: SamplingParams) -> None:
    if not 0 <= params.temperature < float("inf"):  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0 or params.max_new_tokens < 1:
        raise ValueError(f"top_k must be >= 0 and max_new_tokens >= 1 (got {params.top_k}, {params.max_new_tokens})")


def check_prompts(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt non-empty, inside the context with its max_new_tokens (RoPE would decode past it without
    an error, on positions the model never trained on) and made of the model's token ids (a tensor-parallel
    embedding would silently read an unknown id as zeros)."""
    cfg = model.cfg
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(prompt) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: with max_new_tokens = {max_new_tokens} that is "
                             f"{len(prompt) + max_new_tokens}, more than the model's context "
                             f"(max_position_embeddings = {cfg.max_position_embeddings})")
        unknown = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if unknown:
            raise ValueError(f"prompt {i} has token id {unknown[0]}, outside the model's vocabulary "
                             f"[0, {cfg.vocab_size})")


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams | None = None,
             entropies: list | None = None, row_ids: list[int] | None = None) -> list[list[int]]:
    """The tokens appended to each prompt (a stop token ends a row and is included). If `entropies` is a
    list, it receives per row the entropy of the policy at the sampling temperature at each generated token
    (temperature 1 when greedy). A row's
    samples depend only on the seed, the step and its id in `row_ids` (default 0, 1, ...): give ranks
    that share out a set of prompts the prompts' indices in the set, and they draw what one process
    decoding the whole set draws. The ranks of a tensor-parallel group, or of a pipeline, call this
    together with the same prompts and parameters (seed included); those of an expert-parallel group
    together, each with its own prompts (or none) and the same max_new_tokens."""
    params = params or SamplingParams()
    check_generation_layout(model)
    check_sampling(params)
    check_prompts(model, prompts, params.max_new_tokens)
    if row_ids is not None and len(row_ids) != len(prompts):
        raise ValueError(f"{len(row_ids)} row ids for {len(prompts)} prompts")
    if entropies is not None:
        entropies.clear()
    if not prompts and model.pc.ep_size == 1:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with whole_sequences(model):
            if not prompts:  # an expert-parallel rank: its group's MoE exchanges need it at every step
                _generate(model, [[0]], params, device, None, torch.zeros(1, dtype=torch.long, device=device),
                          idle=True)
                return []
            rows = torch.tensor(range(len(prompts)) if row_ids is None else row_ids, dtype=torch.long, device=device)
            return _generate(model, prompts, params, device, entropies, rows)
    finally:
        model.train(was_training)


def _generate(model, prompts, params, device, entropies, row_ids: torch.Tensor, idle: bool = False):
    """`idle`: every row starts done (a placeholder that only keeps an expert-parallel group stepping)."""
    if model.pc.size("pp") > 1:
        from megajoy.model.pipelined_decoding import generate_pipelined

        return generate_pipelined(model, prompts, params, device, entropies, row_ids, idle)
    batch = len(prompts)
    ids, valid, positions = left_padded(prompts, device)
    cache = LatentCache.of_model(model, batch, ids.shape[1] + params.max_new_tokens)
    decoded = Decoded(batch, params, device, idle, entropies is not None)
    step = cached_forward(model, ids, positions, valid, cache, last_only=True)
    next_positions = positions[:, -1:] + 1
    for i in range(params.max_new_tokens):
        tokens, entropy = sample_step(step.logits[:, -1], params, step_uniforms(params, i, row_ids),
                                      entropies is not None)
        decoded.add(tokens, entropy)
        if i == params.max_new_tokens - 1 or all_done(decoded.done, model):
            break
        step = cached_forward(model, tokens[:, None], next_positions, ~decoded.done[:, None], cache)
        next_positions = next_positions + 1
    return decoded.result(entropies)


class Decoded:
    """The tokens (and entropies) decoded so far for a batch's rows, and which rows are done (a stop token
    ends a row and is kept)."""

    def __init__(self, batch: int, params: SamplingParams, device, idle: bool = False, with_entropy: bool = False):
        self.tokens = [[] for _ in range(batch)]
        self.entropies = [[] for _ in range(batch)] if with_entropy else None
        self.done = torch.full((batch,), idle, dtype=torch.bool, device=device)
        self.stops = torch.tensor(list(params.stop_token_ids) or [-1], device=device)

    def add(self, tokens_B: torch.Tensor, entropy_B: torch.Tensor | None) -> None:
        tokens = tokens_B.tolist()  # one copy to the host, not one per row
        entropies = entropy_B.tolist() if self.entropies is not None else None
        for b in torch.nonzero(~self.done).flatten().tolist():
            self.tokens[b].append(tokens[b])
            if entropies is not None:
                self.entropies[b].append(entropies[b])
        self.done = self.done_after(tokens_B)

    def done_after(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """Which rows are done once these tokens are added."""
        return self.done | torch.isin(tokens_B, self.stops)

    def result(self, entropies: list | None) -> list[list[int]]:
        if entropies is not None:
            entropies[:] = self.entropies
        return self.tokens


# ------------------------------------------------------------------------------------------ MTP drafts

class MtpDrafter:
    """Drafts tokens with the model's MTP module: at position j it reads the main model's final hidden
    state h_j and the embedding of token t_{j+1} and predicts t_{j+2}; further drafts feed its own
    output back as h (one module used recursively). Its decoder layer has its own latent cache, whose
    confirmed part always has one entry per main-cache position."""

    def __init__(self, model, capacity: int, device, dtype):
        if not len(model.mtp):
            raise ValueError("--mtp-draft needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.model, self.mtp = model, model.mtp[0]
        self.cache = LatentCache([self.mtp.decoder.self_attn], 1, capacity, device, dtype)
        self.last_hidden, self.last_token = None, None

    def _step(self, hidden_BSD, next_ids_BS):
        start = self.cache.length
        positions = torch.arange(start, start + next_ids_BS.shape[1], device=next_ids_BS.device)[None]
        rope = self.model.sequence_info(positions, None)
        mask = self.cache.step_mask(torch.ones_like(next_ids_BS, dtype=torch.bool))
        x = self.mtp.eh_proj(torch.cat((self.mtp.enorm(self.model.embed(next_ids_BS)), self.mtp.hnorm(hidden_BSD)), -1))
        out = self.mtp.norm(decoder_step(self.mtp.decoder, x, rope.cos, rope.sin, self.cache, mask))
        self.cache.advance(next_ids_BS.shape[1])
        # the whole vocabulary's logits (a tensor-parallel head holds a slice of it)
        return out, self.model.full_logits(self.model.head(out[:, -1])).float().argmax(-1)

    def confirm(self, hidden_BSD: torch.Tensor, next_ids_BS: torch.Tensor) -> None:
        """Entries for newly confirmed positions: their main hidden states and the tokens that follow."""
        out, token = self._step(hidden_BSD, next_ids_BS)
        self.last_hidden, self.last_token = out[:, -1:], token

    def draft(self, k: int) -> list[int]:
        confirmed, drafts = self.cache.length, [int(self.last_token)]
        hidden = self.last_hidden
        for _ in range(k - 1):
            hidden, token = self._step(hidden, self.last_token.new_tensor([[drafts[-1]]]))
            drafts.append(int(token))
        self.cache.truncate(confirmed)
        return drafts


@dataclass
class SpeculativeStats:
    verify_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_pass(self) -> float:
        """Mean acceptance length: tokens each verification pass adds (accepted drafts + the bonus)."""
        return (self.accepted + self.verify_passes) / max(self.verify_passes, 1)


def check_speculative_layout(model) -> None:
    if model.pc.size("pp") > 1 or model.pc.size("cp") > 1:
        raise ValueError("speculative decoding runs under data, tensor and expert parallelism, not pipeline or "
                         "context parallelism (the MTP module drafts from the whole model's last hidden state)")


@torch.no_grad()
def speculative_greedy(model, prompt: list[int], max_new_tokens: int, draft_tokens: int,
                       stop_token_ids=(), drafter=None) -> tuple[list[int], SpeculativeStats]:
    """Greedy decoding of one prompt where the MTP module drafts `draft_tokens` tokens and the main model
    checks them all in one pass; the longest agreeing prefix is kept, plus the main model's own next
    token. The output is plain greedy decoding's (up to floating-point near-ties: the verification pass
    rounds differently from one-token steps). `drafter` stands in for the MTP module (tests)."""
    return speculative_decode(model, [prompt], max_new_tokens, draft_tokens, stop_token_ids, drafter)[0]


@torch.no_grad()
def speculative_decode(model, prompts: list[list[int]], max_new_tokens: int, draft_tokens: int,
                       stop_token_ids=(), drafter=None) -> list[tuple[list[int], SpeculativeStats]]:
    """`speculative_greedy` of each prompt in turn. The ranks of a tensor-parallel group call this together
    with the same prompts; those of an expert-parallel group together, each with its own prompts (or
    none): every main-model pass is one exchange of the group's MoE layers, so a rank whose passes are
    over runs placeholder ones until the group's are (the MTP module is dense and exchanges nothing)."""
    check_speculative_layout(model)
    if draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"draft_tokens and max_new_tokens must be >= 1 (got {draft_tokens}, {max_new_tokens})")
    check_prompts(model, prompts, max_new_tokens)
    was_training = model.training
    model.eval()
    results = []
    try:
        with whole_sequences(model):
            passes = itertools.chain.from_iterable(
                _speculative(model, prompt, max_new_tokens, draft_tokens, set(stop_token_ids), drafter, results)
                for prompt in prompts)
            _in_lockstep(model, passes)
    finally:
        model.train(was_training)
    return results


def _in_lockstep(model, passes) -> None:
    """Runs `passes`, which pauses before each main-model pass, to its end; under expert parallelism each
    rank of the group runs a placeholder pass whenever it has none of its own and another rank has."""
    device, placeholder = next(model.parameters()).device, None
    ahead = next(passes, False)
    while not all_done(torch.tensor([not ahead], device=device), model):
        if ahead:
            ahead = next(passes, False)
            continue
        placeholder = placeholder or LatentCache.of_model(model, 1, 1)
        placeholder.truncate(0)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)  # token 0 at position 0
        cached_forward(model, token, token, token == 0, placeholder)


def _speculative(model, prompt, max_new_tokens, k, stops, drafter, results):
    """Decodes one prompt into `results`, pausing (yielding True) before each main-model pass."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    capacity = len(prompt) + max_new_tokens + k + 1
    cache = LatentCache.of_model(model, 1, capacity)
    drafter = drafter or MtpDrafter(model, capacity, device, dtype)
    ids = torch.tensor([prompt], device=device)
    yield True
    every = torch.ones_like(ids, dtype=torch.bool)
    step = cached_forward(model, ids, torch.arange(len(prompt), device=device)[None], every, cache)
    out = [int(step.logits[0, -1].argmax())]
    drafter.confirm(step.hidden, ids.new_tensor([prompt[1:] + out]))
    stats = SpeculativeStats()
    stopped = out[-1] in stops
    while len(out) < max_new_tokens and not stopped:
        drafts = drafter.draft(k)
        base = cache.length
        tokens = ids.new_tensor([[out[-1]] + drafts])
        yield True
        step = cached_forward(model, tokens, torch.arange(base, base + k + 1, device=device)[None],
                              torch.ones_like(tokens, dtype=torch.bool), cache)
        targets = step.logits[0].argmax(-1).tolist()
        accepted = 0
        while accepted < k and drafts[accepted] == targets[accepted]:
            accepted += 1
        new = drafts[:accepted] + [targets[accepted]]
        cache.truncate(base + accepted + 1)
        drafter.confirm(step.hidden[:, :accepted + 1], ids.new_tensor([new]))
        stats.verify_passes += 1
        stats.drafted += k
        stats.accepted += accepted
        out.extend(new)
        stopped = not stops.isdisjoint(new)  # an accepted draft may be the stop, not only the last token
    for i, token in enumerate(out):
        if token in stops:
            out = out[:i + 1]
            break
    results.append((out[:max_new_tokens], stats))
