"""Training flags with Megatron-LM's names, each mapped onto a config field. Values given on the
command line become `section.field` overrides (applied before `--set`)."""

from megajoy.config import QAT_FORMATS, QAT_MODULES, RECOMPUTE_MODULES

# (flags, config path, argparse keyword arguments)
TRAINING_FLAGS = [
    (["--train-iters"], "train.train_iters", dict(type=int)),
    (["--train-samples"], "train.train_samples", dict(type=int)),
    (["--global-batch-size"], "train.global_batch_size", dict(type=int)),
    (["--micro-batch-size"], "train.micro_batch_size", dict(type=int)),
    (["--rampup-batch-size"], "train.rampup_batch_size", dict(type=int, nargs=3, metavar=("START", "INCREMENT", "SAMPLES"))),
    (["--seed"], "train.seed", dict(type=int)),
    (["--mtp-start-iter"], "train.mtp_start_iter", dict(type=int)),
    (["--mtp-loss-scaling-factor", "--mtp-loss-weight"], "model.mtp_loss_weight", dict(type=float)),
    (["--moe-router-bias-update-rate", "--router-bias-update-rate"], "train.router_bias_update_rate", dict(type=float)),
    (["--freeze-router-bias"], "train.freeze_router_bias", dict(action="store_const", const=True)),
    (["--bf16"], "train.bf16", dict(action="store_const", const=True)),
    (["--fp32"], "train.bf16", dict(action="store_const", const=False)),
    (["--params-dtype"], "train.params_dtype", dict(choices=["fp32", "bf16"])),
    (["--kernels"], "train.kernels", dict(choices=["auto", "torch", "triton"])),
    (["--cross-entropy-chunk"], "train.cross_entropy_chunk", dict(type=int, metavar="TOKENS")),
    (["--recompute-granularity"], "train.recompute_granularity", dict(choices=["full", "selective"])),
    (["--recompute-modules"], "train.recompute_modules", dict(nargs="+", choices=RECOMPUTE_MODULES)),
    (["--recompute-method"], "train.recompute_method", dict(choices=["uniform", "block"])),
    (["--recompute-num-layers"], "train.recompute_num_layers", dict(type=int)),
    (["--log-interval"], "train.log_interval", dict(type=int)),
    (["--eval-interval"], "train.eval_interval", dict(type=int)),
    (["--eval-iters"], "train.eval_iters", dict(type=int)),
    (["--exit-interval"], "train.exit_interval", dict(type=int)),
    (["--exit-duration-in-mins"], "train.exit_duration_in_mins", dict(type=float)),
    (["--plot"], "train.plot", dict(action="store_const", const=True)),
    (["--peak-tflops"], "train.peak_tflops", dict(type=float, metavar="TFLOPS")),
    (["--seq-length"], "data.seq_length", dict(type=int)),
    (["--data-path"], "data.data_path", dict(nargs="+", metavar="[WEIGHT] PREFIX")),
    (["--split"], "data.split", dict()),
    (["--tokenizer", "--tokenizer-model"], "data.tokenizer", dict(metavar="tokenizer.json")),
    (["--eod-token"], "data.eod_token", dict(metavar="TOKEN")),
    (["--data-cache-path"], "data.data_cache_path", dict()),
    (["--eod-mask-loss"], "data.eod_mask_loss", dict(action="store_const", const=True)),
    (["--no-eod-mask-loss"], "data.eod_mask_loss", dict(action="store_const", const=False)),
    (["--optimizer"], "optimizer.optimizer", dict(choices=["adamw", "muon"])),
    (["--muon-momentum"], "optimizer.muon_momentum", dict(type=float)),
    (["--muon-ns-steps"], "optimizer.muon_ns_steps", dict(type=int)),
    (["--muon-ns-dtype"], "optimizer.muon_ns_dtype", dict(choices=["auto", "bf16", "fp32"])),
    (["--muon-scale"], "optimizer.muon_scale", dict(choices=["match_rms_adamw", "original", "none"])),
    (["--muon-per-head"], "optimizer.muon_per_head", dict(action="store_const", const=True)),
    (["--muon-router"], "optimizer.muon_router", dict(action="store_const", const=True)),
    (["--qk-clip-tau"], "optimizer.qk_clip_tau", dict(type=float)),
    (["--lr"], "optimizer.lr", dict(type=float)),
    (["--min-lr"], "optimizer.min_lr", dict(type=float)),
    (["--lr-warmup-iters"], "optimizer.lr_warmup_iters", dict(type=int)),
    (["--lr-decay-style"], "optimizer.lr_decay_style", dict(choices=["constant", "linear", "cosine", "WSD"])),
    (["--lr-wsd-decay-style"], "optimizer.lr_wsd_decay_style", dict(choices=["linear", "cosine", "1-sqrt"])),
    (["--lr-wsd-decay-iters"], "optimizer.lr_wsd_decay_iters", dict(type=int)),
    (["--lr-decay-iters"], "optimizer.lr_decay_iters", dict(type=int)),
    (["--lr-warmup-samples"], "optimizer.lr_warmup_samples", dict(type=int)),
    (["--lr-wsd-decay-samples"], "optimizer.lr_wsd_decay_samples", dict(type=int)),
    (["--lr-decay-samples"], "optimizer.lr_decay_samples", dict(type=int)),
    (["--weight-decay"], "optimizer.weight_decay", dict(type=float)),
    (["--clip-grad"], "optimizer.clip_grad", dict(type=float)),
    (["--adam-beta1"], "optimizer.adam_beta1", dict(type=float)),
    (["--adam-beta2"], "optimizer.adam_beta2", dict(type=float)),
    (["--adam-eps"], "optimizer.adam_eps", dict(type=float)),
    (["--tp", "--tensor-model-parallel-size"], "parallel.tensor_model_parallel_size", dict(type=int)),
    (["--pp", "--pipeline-model-parallel-size"], "parallel.pipeline_model_parallel_size", dict(type=int)),
    (["--virtual-pipeline-stages", "--num-virtual-stages-per-pipeline-rank", "--virtual-pipeline-model-parallel-size"],
     "parallel.virtual_pipeline_model_parallel_size", dict(type=int)),
    (["--pp-schedule"], "parallel.pipeline_schedule", dict(choices=["1f1b", "interleaved", "zero-bubble"])),
    (["--pp-layout"], "parallel.pipeline_layout", dict(type=int, nargs="+", metavar="LAYERS")),
    (["--ep", "--expert-model-parallel-size"], "parallel.expert_model_parallel_size", dict(type=int)),
    (["--cp", "--context-parallel-size"], "parallel.context_parallel_size", dict(type=int)),
    (["--dp", "--data-parallel-size"], "parallel.data_parallel_size", dict(type=int)),
    (["--sequence-parallel"], "parallel.sequence_parallel", dict(action="store_const", const=True)),
    (["--use-distributed-optimizer"], "parallel.use_distributed_optimizer", dict(action="store_const", const=True)),
    (["--ddp-bucket-size-mb"], "parallel.ddp_bucket_size_mb", dict(type=float)),
    (["--async-save"], "parallel.async_save", dict(action="store_const", const=True)),
    (["--no-async-save"], "parallel.async_save", dict(action="store_const", const=False)),
    (["--qat"], "quant.qat", dict(choices=QAT_FORMATS)),
    (["--qat-start-iter"], "quant.qat_start_iter", dict(type=int)),
    (["--qat-modules"], "quant.qat_modules", dict(choices=QAT_MODULES)),
    (["--qat-group"], "quant.qat_group", dict(type=int, choices=[32, 64])),
    (["--fp8"], "quant.fp8", dict(choices=["off", "tensorwise", "blockwise"])),
    (["--fp8-backend"], "quant.fp8_backend", dict(choices=["torch", "te", "emulate"])),
    (["--out"], "checkpoint.out", dict(metavar="DIR")),
    (["--save-interval"], "checkpoint.save_interval", dict(type=int)),
    (["--keep-last"], "checkpoint.keep_last", dict(type=int)),
    (["--resume"], "checkpoint.resume", dict(action="store_const", const=True)),
    (["--init"], "checkpoint.init", dict(metavar="CKPT")),
]


# The model's shape by Megatron-LM's names, onto Hugging Face's config fields (over --preset and --config; every
# command that takes a preset has them).
MODEL_FLAGS = [
    (["--num-layers"], "model.num_hidden_layers", dict(type=int)),
    (["--hidden-size"], "model.hidden_size", dict(type=int)),
    (["--ffn-hidden-size"], "model.intermediate_size", dict(type=int)),
    (["--num-attention-heads"], "model.num_attention_heads", dict(type=int)),
    (["--num-experts"], "model.n_routed_experts", dict(type=int)),
    (["--moe-router-topk"], "model.num_experts_per_tok", dict(type=int)),
    (["--moe-ffn-hidden-size"], "model.moe_intermediate_size", dict(type=int)),
    (["--moe-router-topk-scaling-factor"], "model.routed_scaling_factor", dict(type=float)),
    (["--moe-aux-loss-coeff"], "model.aux_loss_alpha", dict(type=float)),
    (["--q-lora-rank"], "model.q_lora_rank", dict(type=int)),
    (["--kv-lora-rank"], "model.kv_lora_rank", dict(type=int)),
    (["--qk-head-dim"], "model.qk_nope_head_dim", dict(type=int)),
    (["--qk-pos-emb-head-dim"], "model.qk_rope_head_dim", dict(type=int)),
    (["--v-head-dim"], "model.v_head_dim", dict(type=int)),
    (["--max-position-embeddings"], "model.max_position_embeddings", dict(type=int)),
    (["--rotary-base"], "model.rope_theta", dict(type=float)),
    (["--norm-epsilon"], "model.rms_norm_eps", dict(type=float)),
    (["--init-method-std"], "model.initializer_range", dict(type=float)),
    (["--mtp-num-layers"], "model.num_nextn_predict_layers", dict(type=int)),
]


def _dest(path: str, flag: str) -> str:
    return "flag__" + flag.lstrip("-").replace("-", "_")


# The layout flags of commands that only run the model (generation).
LAYOUT_PATHS = ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                "parallel.virtual_pipeline_model_parallel_size", "parallel.pipeline_schedule",
                "parallel.pipeline_layout", "parallel.expert_model_parallel_size", "parallel.data_parallel_size")


# Flags of the Megatron-format pretraining corpus; the post-training stages read their own JSONL (--data).
PRETRAIN_DATA_PATHS = ("data.data_path", "data.split", "data.eod_token", "data.data_cache_path",
                       "data.eod_mask_loss")


def add_training_flags(parser, paths: tuple[str, ...] | None = None, title: str = "training (Megatron-LM names)",
                       without: tuple[str, ...] = (), table: list | None = None) -> None:
    """The flags of `table` (TRAINING_FLAGS by default; only those mapped onto `paths`, if given; none mapped onto
    `without`)."""
    group = parser.add_argument_group(title)
    for flags, path, kwargs in TRAINING_FLAGS if table is None else table:
        if (paths is None or path in paths) and path not in without:
            group.add_argument(*flags, dest=_dest(path, flags[0]), default=None, **_with_metavar(flags[0], kwargs))


def _with_metavar(flag: str, kwargs: dict) -> dict:
    """A value's placeholder named after the flag (--train-iters TRAIN_ITERS), not after its internal dest."""
    if "action" in kwargs or "choices" in kwargs or "metavar" in kwargs:
        return kwargs
    return {**kwargs, "metavar": flag.lstrip("-").upper().replace("-", "_")}


def flag_overrides(args) -> list[str]:
    """`section.field=value` strings for every training flag given on the command line."""
    import json

    overrides, given = [], {}
    for flags, path, _ in MODEL_FLAGS + TRAINING_FLAGS:
        value = getattr(args, _dest(path, flags[0]), None)
        if value is None:
            continue
        if path in given:  # opposite switches (--bf16 / --fp32): neither may silently win
            raise ValueError(f"give {given[path]} or {flags[0]}, not both: each sets {path}")
        given[path] = flags[0]
        overrides.append(f"{path}={json.dumps(value)}")
    return overrides + _run_length(args)


def _run_length(args) -> list[str]:
    """--train-iters and --train-samples each set the run's length; the one given replaces a config's other."""
    iters, samples = (getattr(args, _dest(path, flag), None) for path, flag in
                      (("train.train_iters", "--train-iters"), ("train.train_samples", "--train-samples")))
    if iters is not None and samples is not None:
        raise ValueError("give --train-iters or --train-samples, not both: each sets the run's length")
    return ["train.train_samples=null"] if iters is not None else []
