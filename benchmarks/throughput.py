"""End-to-end training step (forward, backward, AdamW step) of a preset, one process: tokens/s, MFU, peak
memory and, on a GPU, NVML telemetry (memory, power, SM clock, utilisation). Beside it, in the same run
and with the same weights and batch, Hugging Face transformers' DeepseekV3ForCausalLM (the baseline),
TorchTitan's DeepSeek-V3 (`--torchtitan`, benchmarks/torchtitan_baseline.py) and megajoy under
torch.compile (`--compile`). Every variant runs in its own fresh process, so its peak memory is its own.

  python benchmarks/throughput.py                              # tiny preset (2.75M), batch 8 x 256, fp32
  python benchmarks/throughput.py --preset joyai-slice --batch 1 --seq-length 4096 --no-hf    # a GPU
  python benchmarks/throughput.py --layout "" --layout "--dp 2" --layout "--tp 2 --sequence-parallel" \
      --layout "--pp 2" --layout "--ep 2 --dp 2"       # `megajoy pretrain` itself at each layout (CPU: forked
                                                        # gloo ranks; GPUs: run the script under torchrun)

MFU counts model FLOPs as `megajoy info` does (3 x forward, causal attention, no MTP) over the peak
matmul rate measured in each variant's process after its steps (fp32 on a CPU, bf16 on a GPU, where the
step runs under bf16 autocast with fp32 weights as training does; `--params-dtype bf16` adds megajoy with
bf16 weights over fp32 master weights).
Writes benchmarks/results/throughput.json, .md and .png.
"""

import argparse
import importlib
import multiprocessing
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import (environment, markdown_table, measure_floors, print_profile, print_table,  # noqa: E402
                               synchronize, write_json)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Telemetry:
    """NVML samples every 0.1 s while running; a clear "no GPU" record without one."""

    def __init__(self, device: torch.device):
        self.samples, self.handle, self.note = [], None, None
        if device.type != "cuda":
            self.note = "no GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.nvml = pynvml
        except Exception as e:  # nvidia-ml-py missing or NVML unavailable
            self.note = f"NVML unavailable: {e}"

    def __enter__(self):
        self.stop = threading.Event()
        if self.handle is not None:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        nvml = self.nvml
        while not self.stop.wait(0.1):
            self.samples.append({
                "memory_used_gb": nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 1e9,
                "power_w": nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3,
                "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM),
                "utilization_pct": nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu})

    def __exit__(self, *exc):
        self.stop.set()
        if self.handle is not None:
            self.thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"telemetry": self.note or "no samples"}
        keys = self.samples[0].keys()
        return {f"{k}_mean": sum(s[k] for s in self.samples) / len(self.samples) for k in keys} | {
            f"{k}_max": max(s[k] for s in self.samples) for k in keys}


def build_variant(name: str, cfg, state: dict, device, dtype, hf_dir: str, autocast: bool, accumulate: int = 1,
                  seq_length: int = 0):
    """(model, step function taking (inputs, labels)) for one variant. With `autocast`, fp32 weights
    and bf16 autocast, as megajoy's trainer runs on a GPU."""
    from megajoy.kernels.backend import reuse_weight_casts

    if name.startswith("torchtitan"):
        from benchmarks.torchtitan_baseline import build_torchtitan, compile_as_torchtitan

        model, forward = build_torchtitan(cfg, hf_dir, seq_length, device, dtype)
        if "--compile" in name:
            compile_as_torchtitan(model)
    elif name == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).train()

        def forward(inputs, labels):
            # use_cache=False: the exported config keeps use_cache on for generation, under which every
            # training forward would also fill (and copy into) a KV cache that nothing reads
            logits = model(input_ids=inputs, use_cache=False).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    else:
        from megajoy.model import create_model

        if state is None:  # no baseline to share weights with: initialise on the device itself
            model = create_model(cfg, device=device, seed=0, dtype=dtype)
        else:
            model = create_model(cfg, device=device, seed=None, dtype=dtype)
            model.load_state_dict(state)
        model.train()
        core = torch.compile(model) if "--compile" in name else model

        def forward(inputs, labels):
            out = core(inputs, labels=labels, compute_mtp=False, return_logits=False)
            return out.lm_loss_sum / out.lm_tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    weights = None
    if "--params-dtype bf16" in name:  # the optimizer above holds the fp32 masters; the model gets bf16 copies
        from megajoy.optim.master_weights import MasterWeights

        weights, autocast = MasterWeights(model), True

    def micro_batches(inputs, labels):
        if name.startswith("megajoy"):
            # As megajoy's trainer: one autocast region for the step's micro-batches, backward inside it, each
            # weight cast once for it (autocast's own cache; the grouped GEMMs' through reuse_weight_casts).
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), reuse_weight_casts():
                for _ in range(accumulate):
                    forward(inputs, labels).backward()
            return
        for _ in range(accumulate):  # the baselines as their own trainers run: autocast around the forward
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(inputs, labels)
            loss.backward()

    def step(inputs, labels):
        micro_batches(inputs, labels)
        if weights is not None:
            weights.flush_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if weights is not None:
            weights.copy_to_model()

    return model, step


def autocast_on(args) -> bool:
    return args.device.startswith("cuda") and not args.bf16 and not args.fp32


def matmul_dtype(args) -> torch.dtype:
    """The dtype of the step's GEMMs, whose measured rate MFU is over."""
    return torch.bfloat16 if args.bf16 or autocast_on(args) else torch.float32


def resident_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def load_libraries(name: str) -> None:
    """What building the variant loads, loaded before a CPU run's resident baseline, so its peak memory is its
    training's, not its libraries' (the first optimizer loads torch._dynamo, ~90 MB; transformers ~200 MB)."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    if name.startswith("torchtitan"):
        from benchmarks.torchtitan_baseline import import_torchtitan

        import_torchtitan()
    elif name == "transformers":
        for module in ("auto.modeling_auto", "deepseek_v3.modeling_deepseek_v3"):
            importlib.import_module(f"transformers.models.{module}")
    else:
        importlib.import_module("megajoy.model")


def run_variant(name, cfg, state, args, hf_dir, flops_per_token, queue):
    from megajoy.kernels import backend

    backend.configure(backend=args.kernels, cross_entropy_chunk=args.cross_entropy_chunk)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    try:
        if device.type == "cpu":
            load_libraries(name)
        start_kb = resident_kb() if device.type == "cpu" else 0
        model, step = build_variant(name, cfg, state, device, dtype, hf_dir, autocast_on(args), args.accumulate,
                                    args.seq_length)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_length + 1), generator=g).to(device)
                   for _ in range(2)]
        for i in range(args.warmup):
            b = batches[i % 2]
            step(b[:, :-1], b[:, 1:])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        with Telemetry(device) as telemetry:
            started = time.perf_counter()
            for i in range(args.steps):
                b = batches[i % 2]
                step(b[:, :-1], b[:, 1:])
            synchronize(device)
            seconds = (time.perf_counter() - started) / args.steps
        tokens_per_s = args.accumulate * args.batch * args.seq_length / seconds
        peak_gb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                   else (resident_kb("VmHWM") - start_kb) * 1024) / 1e9
        # The matmul rate MFU is over, measured in this process right after its steps: on a shared machine
        # the rate drifts between variants (a rate taken once, before them all, gave MFUs above 1).
        rate = measure_floors(device, matmul_dtype(args)).matmul_flops_per_s
        if args.profile:
            print_profile(lambda: step(batches[0][:, :-1], batches[0][:, 1:]), device)
        queue.put({"variant": name, "step_seconds": seconds, "tokens_per_s": tokens_per_s,
                   "mfu": flops_per_token * tokens_per_s / rate, "matmul_flops_per_s": rate, "peak_memory_gb": peak_gb,
                   **telemetry.summary()})
    except Exception as e:  # recorded, so one failing variant does not hide the others
        queue.put({"variant": name, "error": f"{type(e).__name__}: {e}"})


def main() -> None:
    from megajoy.ckpt.hf import save_hf_dir
    from megajoy.ckpt.native import model_state
    from megajoy.ckpt.view import state_view
    from megajoy.config import load_job_config
    from megajoy.model import create_model
    from megajoy.model.stats import measure, meta_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also run megajoy under torch.compile")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--torchtitan", action="store_true",
                        help="also run TorchTitan's DeepSeek-V3 (release 0.2.2) with the same weights; with "
                             "--compile also compiled as TorchTitan compiles it")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and compute")
    parser.add_argument("--fp32", action="store_true", help="fp32 on a GPU too (default there: fp32 weights "
                        "under bf16 autocast, as training runs; on a CPU: fp32)")
    parser.add_argument("--params-dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: also run megajoy with bf16 weights over fp32 master weights (as `megajoy "
                        "pretrain --params-dtype bf16` trains; its MFU is over the bf16 matmul rate only on a GPU "
                        "without --fp32); with --layout, the layouts' runs use it")
    parser.add_argument("--accumulate", type=int, default=1, metavar="N",
                        help="micro-batches (forward + backward) per optimizer step")
    parser.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto")
    parser.add_argument("--cross-entropy-chunk", type=int, default=None, metavar="TOKENS",
                        help="fused head + loss chunk (default: 4096 on a GPU, off on a CPU; 0: off)")
    parser.add_argument("--profile", action="store_true", help="print the step's most expensive ops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layout", action="append", metavar="FLAGS",
                        help="instead of the one-process variants, time `megajoy pretrain` at this parallel layout "
                        "(its flags in one string, e.g. \"--tp 2 --ep 2\"; \"\" is one process); repeatable")
    parser.add_argument("--out", default=os.path.join(RESULTS, "throughput"))
    args = parser.parse_args()
    if args.bf16 and args.params_dtype == "bf16":
        parser.error("--params-dtype bf16 keeps fp32 master weights beside the bf16 ones; --bf16 has no fp32 weights")
    if args.layout is not None:
        return layouts_main(args)

    import dataclasses
    import tempfile

    job = load_job_config(args.preset, None, [])
    cfg = dataclasses.replace(job.model, num_nextn_predict_layers=0)
    flops_per_token = measure(meta_model(cfg), args.seq_length).training_flops_per_token(with_mtp=False)
    # The weights travel to the variants only when a baseline must start from the same ones.
    baselines = [] if args.no_hf else ["transformers"]
    if args.torchtitan:
        baselines += ["torchtitan"] + (["torchtitan --compile"] if args.compile else [])
    if args.torchtitan:  # refused here, before any variant runs, if it is missing or cannot build this config
        from benchmarks.torchtitan_baseline import check_torchtitan

        try:
            check_torchtitan(cfg)
        except (RuntimeError, ValueError) as e:
            parser.error(str(e))
    model = create_model(cfg, seed=0) if baselines else None
    state = None if model is None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = torch.device(args.device)
    variants = ["megajoy"] + (["megajoy --compile"] if args.compile else [])
    if args.params_dtype == "bf16":
        variants += [v + " --params-dtype bf16" for v in variants]
    variants += baselines
    rows = []
    with tempfile.TemporaryDirectory() as hf_dir:
        if baselines:
            save_hf_dir(hf_dir, state_view(cfg, model_state(model)), dtype=torch.float32)
        del model
        ctx = multiprocessing.get_context("spawn")  # a fork after torch's thread pool started can hang
        for name in variants:
            queue = ctx.Queue()
            process = ctx.Process(target=run_variant, args=(name, cfg, state, args, hf_dir, flops_per_token, queue))
            process.start()
            rows.append(queue.get())
            process.join()
            print(f"{name}: " + (f"{rows[-1]['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in rows[-1]
                                 else rows[-1]["error"]), file=sys.stderr)
    columns = ["variant", "tokens_per_s"]
    for baseline in ("transformers", "torchtitan"):
        base = next((r for r in rows if r["variant"] == baseline and "tokens_per_s" in r), None)
        if base is None:
            continue
        columns.append(f"ratio_to_{baseline}")
        for r in rows:
            if "tokens_per_s" in r:
                r[f"ratio_to_{baseline}"] = r["tokens_per_s"] / base["tokens_per_s"]
    columns += ["mfu", "peak_memory_gb", "step_seconds"]
    print_table(rows, columns)
    payload = {"environment": environment(device), "preset": args.preset, "batch": args.batch,
               "micro_batches_per_step": args.accumulate,
               "seq_length": args.seq_length, "dtype": "bf16" if args.bf16 else ("bf16 autocast" if autocast_on(args) else "fp32"),
               "training_flops_per_token": flops_per_token, "results": rows}
    write_json(args.out + ".json", payload)
    write_markdown(args.out + ".md", payload, columns)
    plot(args.out + ".png", rows)


def layout_world(flags: list[str]) -> tuple[int, int]:
    """(ranks, data-parallel ranks) of a layout given as pretrain flags (DP 1 unless --dp says otherwise)."""
    parser = argparse.ArgumentParser(add_help=False)
    for name, aliases in (("tp", ["--tensor-model-parallel-size"]), ("pp", ["--pipeline-model-parallel-size"]),
                          ("cp", ["--context-parallel-size"]), ("dp", ["--data-parallel-size"])):
        parser.add_argument(f"--{name}", *aliases, type=int, default=1)
    known, _ = parser.parse_known_args(flags)
    return known.tp * known.pp * known.cp * known.dp, known.dp


def run_layout(args, layout: str, out: str) -> dict:
    """`megajoy pretrain` (built-in corpus, no MTP, no evaluation) at one layout; tokens/s from its
    metrics.jsonl, averaged over the steps after the warm-up."""
    import json
    import shlex

    from megajoy.cli import main as megajoy_main
    from megajoy.parallel.spawn import cli_worker, run_workers

    flags = shlex.split(layout)
    world, dp = layout_world(flags)
    iters = args.warmup + args.steps
    argv = ["pretrain", "--preset", args.preset, "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.batch), "--global-batch-size", str(args.batch * args.accumulate * dp),
            "--train-iters", str(iters), "--log-interval", "1", "--eval-interval", str(iters + 1), "--eval-iters", "0",
            "--mtp-start-iter", str(iters + 1), "--kernels", args.kernels, "--params-dtype", args.params_dtype,
            "--out", out, *flags]
    if args.cross_entropy_chunk is not None:
        argv += ["--cross-entropy-chunk", str(args.cross_entropy_chunk)]
    if "RANK" in os.environ:  # under torchrun: every rank runs the trainer here
        if int(os.environ["WORLD_SIZE"]) != world:
            raise SystemExit(f"layout {layout!r} needs {world} ranks, torchrun started {os.environ['WORLD_SIZE']}")
        megajoy_main(argv)
        if int(os.environ["RANK"]) != 0:
            return {}
    elif world == 1:
        megajoy_main(argv)
    else:
        run_workers(world, cli_worker, argv)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "tokens_per_s" in r and r["step"] > args.warmup]
    tokens_per_s = sum(r["tokens_per_s"] for r in records) / len(records)
    peaks = [r["max_memory_allocated_gib"] for r in records if "max_memory_allocated_gib" in r]  # GPUs only
    return {"layout": layout or "(one process)", "ranks": world, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_rank": tokens_per_s / world, **({"peak_memory_gib": max(peaks)} if peaks else {})}


def layouts_main(args) -> None:
    import tempfile

    from megajoy.config import load_job_config
    from megajoy.model.stats import measure, meta_model

    cfg = load_job_config(args.preset, None, []).model
    flops_per_token = measure(meta_model(cfg), args.seq_length).training_flops_per_token(with_mtp=False)
    device = torch.device(args.device)
    peak = measure_floors(device, torch.bfloat16 if device.type == "cuda" else torch.float32).matmul_flops_per_s
    rows = []
    for layout in args.layout:
        with tempfile.TemporaryDirectory() as out:
            row = run_layout(args, layout, out)
        if not row:  # a rank other than 0 under torchrun: on to the next layout with the others
            continue
        row["mfu"] = flops_per_token * row["tokens_per_s_per_rank"] / peak
        rows.append(row)
        print(f"{row['layout']}: {row['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    if not rows:
        return
    columns = ["layout", "ranks", "tokens_per_s", "tokens_per_s_per_rank", "mfu"]
    columns += ["peak_memory_gib"] if all("peak_memory_gib" in r for r in rows) else []
    print_table(rows, columns)
    payload = {"environment": environment(device), "preset": args.preset, "batch": args.batch,
               "seq_length": args.seq_length, "micro_batches_per_step": args.accumulate,
               "training_flops_per_token": flops_per_token, "peak_matmul_flops": peak, "layouts": rows}
    write_json(args.out + "_layouts.json", payload)


def write_markdown(path: str, payload: dict, columns: list[str]) -> None:
    env = payload["environment"]
    rows = [r if "tokens_per_s" in r else r | {"tokens_per_s": r.get("error")} for r in payload["results"]]
    lines = [f"{payload['preset']}, batch {payload['batch']} x {payload['seq_length']}, {payload['dtype']}, "
             f"{env['device']} ({env.get('gpu', env['cpu'])}, {env['threads']} threads), torch {env['torch']}, "
             f"{env['date']}", "", *markdown_table(rows, columns)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["variant"] for r in done], [r["tokens_per_s"] for r in done])
    ax.set_xlabel("training tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
