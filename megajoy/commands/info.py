"""`megajoy info`: parameters, FLOPs and KV cache, counted from the real modules on the meta device;
with layout flags, the memory each pipeline stage's ranks need."""

import dataclasses
import json

from megajoy.cli import add_config_arguments
from megajoy.config import QAT_FORMATS, QAT_MODULES, RECOMPUTE_MODULES


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--seq-length", type=int, default=4096, help="sequence length for FLOPs and memory")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    plan = parser.add_argument_group("memory plan (given any of these)")
    plan.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int)
    plan.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int)
    plan.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int)
    plan.add_argument("--dp", "--data-parallel-size", dest="dp", type=int)
    plan.add_argument("--virtual-pipeline-stages", dest="virtual", type=int)
    plan.add_argument("--schedule", "--pp-schedule", dest="schedule", choices=["1f1b", "interleaved", "zero-bubble"])
    plan.add_argument("--pp-layout", type=int, nargs="+", metavar="LAYERS")
    plan.add_argument("--sequence-parallel", action="store_true")
    plan.add_argument("--use-distributed-optimizer", action="store_true")
    plan.add_argument("--micro-batch-size", type=int, default=1)
    plan.add_argument("--global-batch-size", type=int, help="default: one micro-batch per pipeline stage and DP rank")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU to check the plan against")
    plan.add_argument("--precision", choices=["bf16", "fp32"],
                      help="bf16: the step under bf16 autocast, as on GPUs; fp32: without, as --fp32 trains "
                           "(default: bf16 unless the configuration's train.bf16 is false)")
    plan.add_argument("--kernels", choices=["auto", "torch", "triton"],
                      help="as training takes it: auto plans a GPU's fused kernels, torch the torch references "
                           "(default: the configuration's train.kernels)")
    plan.add_argument("--cross-entropy-chunk", type=int, metavar="TOKENS",
                      help="0 plans the unfused head and loss (default: the configuration's, chunked on GPUs)")
    plan.add_argument("--params-dtype", choices=["fp32", "bf16"],
                      help="bf16: bf16 weights over fp32 master weights, as `--params-dtype bf16` trains "
                           "(default: the configuration's train.params_dtype)")
    plan.add_argument("--recompute-granularity", choices=["full", "selective"],
                      help="activation recomputation, as training takes it")
    plan.add_argument("--recompute-method", choices=["uniform", "block"])
    plan.add_argument("--recompute-num-layers", type=int)
    plan.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES)
    plan.add_argument("--optimizer", choices=["adamw", "muon"],
                      help="default: what `megajoy pretrain` uses for the preset (Muon for the JoyAI presets)")
    plan.add_argument("--qat", choices=QAT_FORMATS, help="QAT, as training takes it (default: the configuration's)")
    plan.add_argument("--qat-modules", choices=QAT_MODULES)
    plan.add_argument("--rollout-qat", choices=QAT_FORMATS,
                      help="RL rollouts under fake-quantised weights, as `megajoy rl` takes it: with bf16 weights "
                           "under ZeRO-1, their kept values")
    plan.add_argument("--rollout-qat-modules", choices=QAT_MODULES, default="routed-experts")


def run(args) -> int:
    from megajoy.config import load_job_config
    from megajoy.model.stats import measure, meta_model
    from megajoy.stages.flags import flag_overrides
    from megajoy.stages.pretrain import RECIPES

    # On the preset's pretraining recipe (its optimizer: Muon for the JoyAI presets), as `megajoy pretrain` runs.
    job = load_job_config(args.preset, args.config, flag_overrides(args) + args.overrides,
                          defaults=RECIPES.get(args.preset or "tiny"))
    # Plan flags over the configuration's fields (a YAML file or --set may have set them).
    job = dataclasses.replace(
        job, optimizer=dataclasses.replace(job.optimizer, optimizer=args.optimizer or job.optimizer.optimizer),
        train=dataclasses.replace(job.train, params_dtype=args.params_dtype or job.train.params_dtype,
                                  kernels=args.kernels or job.train.kernels,
                                  cross_entropy_chunk=_given(args.cross_entropy_chunk, job.train.cross_entropy_chunk),
                                  recompute_granularity=args.recompute_granularity or job.train.recompute_granularity,
                                  recompute_method=args.recompute_method or job.train.recompute_method,
                                  recompute_num_layers=args.recompute_num_layers or job.train.recompute_num_layers,
                                  recompute_modules=args.recompute_modules or job.train.recompute_modules),
        parallel=dataclasses.replace(job.parallel, use_distributed_optimizer=args.use_distributed_optimizer or
                                     job.parallel.use_distributed_optimizer),
        quant=dataclasses.replace(job.quant, qat=args.qat or job.quant.qat,
                                  qat_modules=args.qat_modules or job.quant.qat_modules))
    stats = measure(meta_model(job.model), seq_length=args.seq_length)
    plan = _memory_plan(args, job) if _wants_plan(args) else None
    if args.json:
        payload = stats.as_dict()
        if plan is not None:
            payload["memory_plan"] = [m.as_dict() for m in plan]
        print(json.dumps(payload, indent=2))
        return 0
    print(format_stats(stats, job.model, args.preset or "tiny", args.seq_length))
    if plan is not None:
        from megajoy.parallel.memory import format_plan

        print(f"memory per GPU ({_layout_text(args, job)}, {_OPTIMIZERS[job.optimizer.optimizer]}, "
              f"{job.train.params_dtype} weights, micro-batch {args.micro_batch_size} x {args.seq_length}, "
              f"{_activation_format(args, job).describe()}):")
        print(format_plan(plan, args.gpu_memory))
    return 0


_OPTIMIZERS = {"adamw": "AdamW", "muon": "Muon"}


def _given(value, default):
    return default if value is None else value


def _activation_format(args, job):
    from megajoy.parallel.memory import ActivationFormat

    bf16 = args.precision == "bf16" if args.precision else job.train.bf16 is not False
    return ActivationFormat.of(bf16, job.train.params_dtype, job.train.kernels, job.train.cross_entropy_chunk)


def _wants_plan(args) -> bool:
    return any(getattr(args, k) is not None for k in ("tp", "pp", "ep", "dp", "virtual", "schedule", "pp_layout"))


def _layout_text(args, job) -> str:
    from megajoy.model.recompute import Recompute

    parallel = _plan_parallel(args, job.parallel)
    sizes = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
             parallel.expert_model_parallel_size, parallel.data_parallel_size)
    parts = [f"{name} {size}" for name, size in zip(("TP", "PP", "EP", "DP"), sizes)]
    if parallel.sequence_parallel:
        parts.append("SP")
    if job.parallel.use_distributed_optimizer:
        parts.append("ZeRO-1")
    if job.train.recompute_granularity == "selective":
        parts.append("recompute " + " ".join(Recompute.of(job.train).modules))
    elif job.train.recompute_granularity:
        parts.append(f"recompute {job.train.recompute_method} {job.train.recompute_num_layers}")
    if job.quant.qat:
        parts.append(f"QAT {job.quant.qat} {job.quant.qat_modules}")
    if args.rollout_qat:
        parts.append(f"rollouts {args.rollout_qat} {args.rollout_qat_modules}")
    return " x ".join(parts[:4]) + "".join(", " + p for p in parts[4:])


def _plan_parallel(args, configured):
    """The layout flags over the configuration's parallel section (a YAML file or --set may have set it);
    DP 1 where neither gives it (training infers it from the world size)."""
    flags = {"tensor_model_parallel_size": args.tp, "pipeline_model_parallel_size": args.pp,
             "expert_model_parallel_size": args.ep, "data_parallel_size": args.dp,
             "virtual_pipeline_model_parallel_size": args.virtual, "pipeline_layout": args.pp_layout}
    parallel = dataclasses.replace(configured, **{k: v for k, v in flags.items() if v is not None})
    schedule = args.schedule or ("interleaved" if args.virtual and configured.pipeline_schedule == "1f1b"
                                 else configured.pipeline_schedule)
    return dataclasses.replace(parallel, pipeline_schedule=schedule, sequence_parallel=args.sequence_parallel or
                               configured.sequence_parallel, data_parallel_size=parallel.data_parallel_size or 1)


def _memory_plan(args, job):
    from megajoy.model.recompute import Recompute
    from megajoy.parallel.memory import plan_memory

    parallel = _plan_parallel(args, job.parallel)
    pp, dp = parallel.pipeline_model_parallel_size, parallel.data_parallel_size
    world = parallel.tensor_model_parallel_size * parallel.context_parallel_size * dp * pp
    dataclasses.replace(job, parallel=parallel)  # the checks training makes of the whole job (JobConfig)
    per_step = _micro_batches_per_step(args, dp, pp, parallel.pipeline_schedule)
    return plan_memory(job.model, parallel, world, args.micro_batch_size, args.seq_length, per_step,
                       _activation_format(args, job), params_dtype=job.train.params_dtype,
                       optimizer=job.optimizer, qat=(job.quant.qat, job.quant.qat_modules) if job.quant.qat else None,
                       recompute=Recompute.of(job.train),
                       rollout_qat=(args.rollout_qat, args.rollout_qat_modules) if args.rollout_qat else None)


def _micro_batches_per_step(args, dp: int, pp: int, schedule: str) -> int:
    """Micro-batches per step and DP rank, refused where training refuses them (Trainer._check_batch_layout)."""
    from megajoy.parallel.pipeline import check_micro_batches

    if args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} must be >= 1")
    if args.global_batch_size is None:
        return pp
    unit = args.micro_batch_size * dp
    if args.global_batch_size < 1 or args.global_batch_size % unit:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a positive multiple of "
                         f"micro-batch size x DP = {args.micro_batch_size} x {dp} = {unit}")
    per_step = args.global_batch_size // unit
    check_micro_batches(per_step, pp, schedule, f"--global-batch-size {args.global_batch_size}")
    return per_step


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
