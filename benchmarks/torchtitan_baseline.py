"""TorchTitan's DeepSeek-V3 (`torchtitan.models.deepseek_v3`, release 0.2.2) as a training-step baseline:
the same architecture as a megajoy config, loaded with the same weights through TorchTitan's own Hugging
Face state-dict adapter. Release 0.3 needs a PyTorch nightly and only FlexAttention / varlen attention;
0.2.2 runs on a released torch and keeps SDPA (causal), which is what megajoy's unpacked batches need.

TorchTitan makes its own choices where it has one: grouped GEMMs (bf16) on SM90 and later GPUs, a loop
over experts elsewhere, as its `update_from_config` decides; SDPA attention; its RoPE (complex, i.e.
interleaved pairs, as JoyAI's checkpoints are laid out). Its final norm keeps torch's default epsilon
instead of the config's, which moves the logits by ~0.1% (the test sets it to compare them exactly).

Errors are RuntimeError / ValueError, so that a variant process records them as its row's error.
"""

import torch

RELEASE = "0.2.2"


def check_torchtitan(cfg) -> None:
    """Refuse, without importing TorchTitan (~10 s), where it is missing, another release, or has no equal
    of the config."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torchtitan")
    except PackageNotFoundError:
        raise RuntimeError(f"--torchtitan needs TorchTitan: pip install torchtitan=={RELEASE}") from None
    if found != RELEASE:
        raise RuntimeError(f"--torchtitan is written against TorchTitan {RELEASE}, found {found}")
    unsupported = {"rope_scaling": cfg.rope_scaling is not None,  # TorchTitan applies YaRN only past its length
                   "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
                   "hidden_act": cfg.hidden_act != "silu", "aux_loss_alpha": cfg.aux_loss_alpha > 0}
    if any(unsupported.values()):
        raise ValueError("--torchtitan: TorchTitan's DeepSeek-V3 has no equal of this config's "
                         + ", ".join(k for k, v in unsupported.items() if v))


def import_torchtitan():
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.deepseek_v3.model.state_dict_adapter import DeepSeekV3StateDictAdapter
    from torchtitan.models.moe import MoEArgs

    return DeepSeekV3ModelArgs, DeepSeekV3Model, DeepSeekV3StateDictAdapter, MoEArgs


def torchtitan_args(cfg, seq_length: int, device: torch.device):
    """TorchTitan's model arguments for a megajoy ModelConfig, or a clear refusal where it has no equal."""
    check_torchtitan(cfg)
    ModelArgs, _, _, MoEArgs = import_torchtitan()
    grouped = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    groups = {} if cfg.n_group == 1 else {"num_expert_groups": cfg.n_group, "num_limited_groups": cfg.topk_group}
    moe = MoEArgs(num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
                  score_func=cfg.scoring_func, route_norm=cfg.norm_topk_prob, route_scale=cfg.routed_scaling_factor,
                  score_before_experts=False,  # DeepSeek-V3 weights the experts' outputs, not their inputs
                  top_k=cfg.num_experts_per_tok, use_grouped_mm=grouped, load_balance_coeff=1e-3, **groups)
    args = ModelArgs(max_seq_len=seq_length, vocab_size=cfg.vocab_size, dim=cfg.hidden_size,
                     inter_dim=cfg.intermediate_size, moe_inter_dim=cfg.moe_intermediate_size,
                     n_layers=cfg.num_hidden_layers, n_dense_layers=cfg.first_k_dense_replace,
                     n_heads=cfg.num_attention_heads, norm_eps=cfg.rms_norm_eps, moe_args=moe,
                     q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
                     qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                     v_head_dim=cfg.v_head_dim, attn_type="sdpa", attn_mask_type="causal",
                     original_seq_len=max(seq_length, cfg.max_position_embeddings),  # no YaRN, no mscale
                     rope_theta=cfg.rope_theta, rope_factor=1.0)
    args.moe_impl = "standard"  # set by update_from_config in TorchTitan's trainer: its all-to-all path
    return args


def build_torchtitan(cfg, hf_dir: str, seq_length: int, device: torch.device, dtype: torch.dtype):
    """(model, forward(inputs, labels) -> mean loss) with the weights of the Hugging Face directory."""
    from megajoy.ckpt.safetensors_io import SafetensorsDir

    _, Model, Adapter, _ = import_torchtitan()
    args = torchtitan_args(cfg, seq_length, device)
    if device.type == "cpu":
        _count_integers_on_cpu()
    with torch.device(device):
        model = Model(args)
    with torch.no_grad():
        model.init_weights(buffer_device=device)  # buffers (RoPE table, expert bias, load counts)
    store = SafetensorsDir(hf_dir)
    state = Adapter(args, None).from_hf({name: store.load(name) for name in store.weight_map})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"TorchTitan's adapter left weights out: missing {missing}, unexpected {unexpected}")
    for p in model.parameters():  # not Module.to(dtype): the RoPE table is complex, the router's counts fp32
        p.data = p.data.to(dtype)
    model.train()

    def forward(inputs, labels):
        logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return model, forward


def _count_integers_on_cpu() -> None:
    """TorchTitan's router counts tokens per expert with `torch.histc` on int64 expert ids, which CUDA
    accepts and torch's CPU kernel does not; give the CPU kernel floats and hand back the ids' dtype (the
    same counts). Only in the process running the TorchTitan variant."""
    histc = torch.histc

    def histc_any_dtype(x, *args, **kwargs):
        if x.is_floating_point():
            return histc(x, *args, **kwargs)
        return histc(x.float(), *args, **kwargs).to(x.dtype)

    torch.histc = histc_any_dtype


def compile_as_torchtitan(model) -> None:
    """TorchTitan's own `apply_compile` (each block, or each MoE block's parts but the experts)."""
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama4.infra.parallelize import apply_compile

    apply_compile(model, Compile(enable=True), ep_enabled=False)
