"""`megajoy info`: parameters, FLOPs and KV cache, counted from the real modules on the meta device."""

import json

from megajoy.cli import add_config_arguments, job_config_from_args


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--seq-length", type=int, default=4096, help="sequence length for the FLOP count")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")


def run(args) -> int:
    from megajoy.model.stats import measure, meta_model

    job = job_config_from_args(args)
    stats = measure(meta_model(job.model), seq_length=args.seq_length)
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        print(format_stats(stats, job.model, args.preset or "tiny", args.seq_length))
    return 0


def _b(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_stats(stats, cfg, name: str, seq_length: int) -> str:
    rows = [
        ("total parameters", f"{_b(stats.total_params)} ({stats.total_params:,}; main model, without MTP)"),
        ("embedding / output head", f"{_b(stats.embedding_params)} / {_b(stats.head_params)}"),
        ("active per token", f"{_b(stats.active_params)} without embedding and head, "
                             f"{_b(stats.active_params_with_embeddings)} with"),
        ("MTP module", f"{_b(stats.mtp_params)} ({stats.mtp_params:,}; shares embedding and head)"),
        ("training FLOPs per token", f"{stats.training_flops_per_token(False) / 1e9:.2f} GFLOP at seq {seq_length} "
                                     f"(causal), {stats.training_flops_per_token(True) / 1e9:.2f} GFLOP with MTP"),
        ("KV cache per token", f"{stats.kv_cache_bytes_per_token:,} bytes (bf16 latent {cfg.kv_lora_rank} + rope "
                               f"{cfg.qk_rope_head_dim}, {cfg.num_hidden_layers} layers)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"megajoy info: {name}"] + [f"  {k:<{width}}  {v}" for k, v in rows])
