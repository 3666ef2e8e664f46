"""GGUF export for llama.cpp: architecture `deepseek2`, written one tensor at a time with the `gguf` package.

llama.cpp runs MLA in its absorbed form, so `kv_b_proj` ([H * (nope + v), kv_lora]) is split per head
into `attn_k_b` (transposed: [H, kv_lora, nope]) and `attn_v_b` ([H, v, kv_lora]). Routed experts are
stacked per layer (`ffn_{gate,up,down}_exps`), the router bias becomes `exp_probs_b.bias`, and the
gating function is written explicitly (sigmoid): without it llama.cpp assumes DeepSeek-V2's softmax.

Tensor types follow llama.cpp's own converter: norms, 1-D tensors and the router stay f32; every other
weight takes the requested type, falling back to f16 where a row is not a whole number of 32-wide
blocks. Q8_0 / Q4_0 blocks are computed by megajoy's QAT quantisers, which are bit-exact with ggml, so
`--gguf-type qat` writes the tensors a model was trained with fake-quant on exactly on their training
grid (the rest in `--dtype`).

The MTP module is not exported: llama.cpp's deepseek2 graph expects a mixture-of-experts block for the
next-token-prediction layer, and JoyAI's MTP layer is dense.
"""

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

BLOCK_TYPES = ("q8_0", "q4_0")  # ggml's quantisations in 32-wide blocks, which QAT can train on exactly
GGUF_TYPES = ("f32", "f16", "bf16", *BLOCK_TYPES, "qat")
_DTYPE_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # torch order
    kind: str  # f32 | f16 | bf16 | q8_0 | q4_0
    pieces: Callable[[], Iterator[torch.Tensor]]  # float tensors whose rows, in order, make the tensor

    @property
    def row_bytes(self) -> int:
        n = self.shape[-1]
        return {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8_0": n // 32 * 34, "q4_0": n // 32 * 18}[self.kind]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape[:-1]) * self.row_bytes


def encode(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """A float tensor -> its GGUF bytes (uint8, last dimension in bytes)."""
    from megajoy.quant.formats import WeightFormat
    from megajoy.quant.pack import pack_ggml

    if kind in BLOCK_TYPES:
        fmt = WeightFormat.of(kind)
        return pack_ggml(*fmt.quantize(tensor), fmt)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind]
    return tensor.to(dtype).contiguous().view(torch.uint8)


class _Bytes:
    """What GGUFWriter.write_tensor_data needs of an array (its size and `tofile`), produced piece by
    piece so a stacked expert tensor never exists whole in memory."""

    def __init__(self, tensor: GgufTensor):
        self.tensor = tensor
        self.nbytes = tensor.nbytes

    ROWS_ELEMENTS = 1 << 22  # encode a few million values at a time: quantising makes several temporaries

    def tofile(self, f) -> None:
        written, width = 0, self.tensor.shape[-1]
        for piece in self.tensor.pieces():
            rows = piece.reshape(-1, width)
            step = max(1, self.ROWS_ELEMENTS // width)
            for start in range(0, rows.shape[0], step):
                data = encode(rows[start:start + step], self.tensor.kind).reshape(-1).numpy()
                written += data.nbytes
                data.tofile(f)
        if written != self.nbytes:
            raise ValueError(f"GGUF tensor {self.tensor.name}: wrote {written} bytes, expected {self.nbytes}")


# ------------------------------------------------------------------------------------------ tensor plan

def gguf_tensors(view, gguf_type: str, rest_dtype: torch.dtype = torch.bfloat16
                 ) -> tuple[list[GgufTensor], list[str]]:
    """Every tensor of the GGUF file, each with its type and a lazy producer; and the names of those
    that fell back to f16 (rows not whole 32-wide blocks)."""
    import gguf

    cfg = view.cfg
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    chooser = _TypeChooser(view, gguf_type, rest_dtype)
    out: list[GgufTensor] = []

    def add(gguf_name: str, source: str, shape, pieces):
        out.append(GgufTensor(gguf_name, tuple(shape), chooser.kind(gguf_name, source, shape), pieces))

    for name in view.dense_names():
        if name.startswith("mtp."):
            continue
        hf_name = name if name == "lm_head.weight" else "model." + name
        if name.endswith("self_attn.kv_b_proj.weight"):
            _add_kv_b(view, name, names, add)
            continue
        if name.endswith("mlp.gate.e_score_correction_bias"):
            base, suffix = hf_name[: -len("_bias")], ".bias"
        else:
            base, suffix = hf_name.rsplit(".", 1)[0], "." + hf_name.rsplit(".", 1)[1]
        gguf_name = names.get_name(base)
        if gguf_name is None or suffix not in (".weight", ".bias"):
            raise ValueError(f"{view.source}: tensor {view.display_name(name)!r} has no llama.cpp deepseek2 name")
        add(gguf_name + suffix, name, view.dense_shape(name), lambda name=name: iter((view.served(name),)))
    for layer in view.moe_layers():
        _add_experts(view, layer, names, add)
    return out, chooser.fallbacks


def _add_kv_b(view, name, names, add) -> None:
    cfg = view.cfg
    heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    base = "model." + name[: -len(".kv_b_proj.weight")]

    def split(part):
        kv_b = view.dense(name).view(heads, nope + v, cfg.kv_lora_rank)
        if part == "k":
            return iter((kv_b[:, :nope].transpose(1, 2).contiguous(),))
        return iter((kv_b[:, nope:],))

    add(names.get_name(base + ".k_b_proj") + ".weight", name + "#k_b", (heads, cfg.kv_lora_rank, nope), lambda: split("k"))
    add(names.get_name(base + ".v_b_proj") + ".weight", name + "#v_b", (heads, v, cfg.kv_lora_rank), lambda: split("v"))


def _add_experts(view, layer, names, add) -> None:
    n = view.cfg.n_routed_experts
    for proj in ("gate_proj", "up_proj", "down_proj"):
        gguf_name = names.get_name(f"model.layers.{layer}.mlp.experts.{proj}") + ".weight"
        source = f"layers.{layer}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        add(gguf_name, source, (n, *view.expert_shape(proj)),
            lambda proj=proj: (view.expert(layer, e, proj) for e in range(n)))


class _TypeChooser:
    """llama.cpp's rules for which tensors stay f32, the requested type otherwise (qat: the training
    grid for fake-quantised tensors, `rest_dtype` for the others)."""

    def __init__(self, view, gguf_type: str, rest_dtype: torch.dtype):
        self.gguf_type = gguf_type
        self.rest = _DTYPE_TYPES[rest_dtype]
        self.qat_format, self.qat_sources = None, set()
        if gguf_type == "qat":
            self.qat_format, self.qat_sources = _qat_sources(view)
        self.fallbacks: list[str] = []

    def kind(self, gguf_name: str, source: str, shape) -> str:
        if len(shape) <= 1 or gguf_name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            return "f32"
        if self.gguf_type != "qat":
            kind = self.gguf_type
        elif source in self.qat_sources:
            kind = self.qat_format
        else:
            kind = self.rest
        if kind in BLOCK_TYPES and shape[-1] % 32:
            self.fallbacks.append(gguf_name)
            return "f16"
        return kind


def _qat_sources(view) -> tuple[str, set[str]]:
    """(QAT format, megajoy names of the weights trained with fake-quant). `kv_b_proj` is not on the
    list as a whole: its split k_b is transposed, so its quantisation blocks would run along another
    axis; v_b keeps the original rows and is exact."""
    from megajoy.model.stats import meta_model
    from megajoy.quant.qat import qat_targets

    quant = view.job.quant
    if quant.qat is None:
        raise ValueError(f"{view.source}: --gguf-type qat needs a checkpoint trained with fake-quant "
                         f"(--qat q4_0 or q8_0); this one has quant.qat=null")
    if quant.qat not in BLOCK_TYPES:
        raise ValueError(f"{view.source}: QAT format {quant.qat!r} has no GGUF type with the same grid (its "
                         f"scale is max/7.5 in fp32); train with --qat q4_0 or q8_0 for a GGUF-exact grid")
    sources = set()
    for module_name, module in qat_targets(meta_model(view.cfg), quant.qat_modules):
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim >= 2:
                sources.add(f"{module_name}.{pname}")
    sources = {s + "#v_b" if s.endswith("kv_b_proj.weight") else s for s in sources}
    return quant.qat, sources


# ------------------------------------------------------------------------------------------ metadata

def add_model_metadata(writer, cfg, file_type: int) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("megajoy JoyAI")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(1)  # MLA runs as multi-query attention over the shared latent
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_leading_dense_block_count(cfg.first_k_dense_replace)
    writer.add_q_lora_rank(cfg.q_lora_rank or 0)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_group_count(cfg.n_group)
    writer.add_expert_group_used_count(cfg.topk_group)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    scaling = cfg.rope_scaling or {}
    if scaling.get("type", scaling.get("rope_type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if key in scaling:
                add(scaling[key])
        # llama.cpp divides this key by 0.1 when it reads a deepseek2 file (its converter multiplies)
        writer.add_rope_scaling_yarn_log_mul(0.1 * scaling.get("mscale_all_dim", 0.0))


def llama_cpp_unsupported(cfg) -> str | None:
    """What of this configuration llama.cpp's deepseek2 does not compute, if anything."""
    scaling = cfg.rope_scaling or {}
    if cfg.attention_bias:
        return "has no attention biases (attention_bias=true)"
    if cfg.n_shared_experts == 0 and cfg.first_k_dense_replace < cfg.num_hidden_layers:
        return "needs a shared expert in every MoE layer (n_shared_experts=0)"
    if scaling.get("type", scaling.get("rope_type")) == "yarn" and (
            "mscale" not in scaling or scaling.get("mscale") != scaling.get("mscale_all_dim")):
        return (f"scales YaRN attention by one mscale, given as mscale_all_dim (rope_scaling has mscale "
                f"{scaling.get('mscale')}, mscale_all_dim {scaling.get('mscale_all_dim')})")
    if "attention_factor" in scaling or not scaling.get("truncate", True):
        return "has no YaRN attention_factor or truncate=false (rope_scaling sets them)"
    return None


def add_tokenizer(writer, tokenizer_file: str, cfg, pre: str | None) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` tokenizer model: tokens by id (ids the tokenizer does not
    use padded as unused), token types, merges, special token ids, and the chat template."""
    import json

    import gguf

    from megajoy.data.chat import chat_template_for

    with open(tokenizer_file, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_file}: GGUF export supports byte-level BPE tokenizers, this one is "
                         f"{model.get('type')!r}")
    pre = pre or _detect_pre_tokenizer(spec, tokenizer_file)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= cfg.vocab_size:
        raise ValueError(f"{tokenizer_file}: token id {max(by_id)} is outside the model's vocab_size={cfg.vocab_size}")
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = by_id[i]
        tokens.append(tok)
        if tok in added:
            types.append(gguf.TokenType.CONTROL if added[tok].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    from megajoy.data.tokenizer import PAD_TOKEN

    if PAD_TOKEN in vocab:
        writer.add_pad_token_id(vocab[PAD_TOKEN])
    # megajoy packs documents separated by EOD and never starts a sequence with BOS
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    template = chat_template_for(tokenizer_file)
    if template:
        writer.add_chat_template(template)


def _detect_pre_tokenizer(spec: dict, source: str) -> str:
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False) \
            and not spec.get("normalizer"):
        return "gpt-2"  # GPT-2's split regex, which ByteLevel applies
    raise ValueError(f"{source}: cannot tell which llama.cpp pre-tokenizer matches this tokenizer's "
                     f"pre-tokenization; name it with --gguf-tokenizer-pre (e.g. deepseek-v3)")


# ------------------------------------------------------------------------------------------ writing

FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}


def save_gguf(path: str, view, gguf_type: str = "f16", rest_dtype: torch.dtype = torch.bfloat16,
              tokenizer_pre: str | None = None) -> list[str]:
    """Write `path` (atomically: a temporary sibling renamed at the end). Returns the tensors that fell
    back to f16 because their rows are not whole 32-wide blocks."""
    import gguf

    from megajoy.ckpt.atomic import temporary_sibling

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type {gguf_type!r} must be one of {GGUF_TYPES}")
    cfg = view.cfg
    unsupported = llama_cpp_unsupported(cfg)
    if unsupported:
        raise ValueError(f"{view.source}: llama.cpp's deepseek2 {unsupported}; it would not run this model as it is")
    if view.tokenizer is None:
        raise ValueError(f"{view.source}: no tokenizer.json beside the weights; a GGUF file must carry its tokenizer")
    tensors, fallbacks = gguf_tensors(view, gguf_type, rest_dtype)
    file_type = FILE_TYPES[view.job.quant.qat if gguf_type == "qat" else gguf_type]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_sibling(path)
    writer = gguf.GGUFWriter(tmp, "deepseek2")
    try:
        add_model_metadata(writer, cfg, file_type)
        add_tokenizer(writer, view.tokenizer, cfg, tokenizer_pre)
        for t in tensors:
            qtype = gguf.GGMLQuantizationType[t.kind.upper()]
            writer.add_tensor_info(t.name, (*t.shape[:-1], t.row_bytes), np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(_Bytes(t))
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return fallbacks
