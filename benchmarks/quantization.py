"""Quantisation throughput: megajoy's fake-quant (quantise + dequantise) for int4 / q4_0 / q8_0 and its
FP8 rounding, each beside a baseline measured in the same run (gguf's own numpy code for the ggml grids,
compressed-tensors for int4), in GB/s of weights processed; INT4 QAT sampling (RL's quantised rollouts)
with each weight quantised once per rollout against quantising in every decoding step. On a GPU it also
times a `joyai-slice` training step with FP8 (tensorwise) against bf16.

  python benchmarks/quantization.py [--rows 4096 --cols 2048]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, measure_floors, print_table, time_call, write_json  # noqa: E402


def _baselines(w: torch.Tensor):
    out = {}
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        host = w.cpu().numpy()
        for name in ("Q8_0", "Q4_0"):
            kind = getattr(GGMLQuantizationType, name)
            out[name.lower()] = ("gguf (numpy)", lambda kind=kind: dequantize(quantize(host, kind), kind))
    except ImportError:
        pass
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from compressed_tensors.quantization.utils import calculate_qparams

        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)

        def ct():
            groups = w.unflatten(-1, (-1, 64))
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            return fake_quantize(w, scale, zero, args)

        out["int4"] = ("compressed-tensors", ct)
    except ImportError:
        pass
    return out


def quantisation_rows(rows: int, cols: int, device: torch.device) -> list[dict]:
    from megajoy.quant.formats import WeightFormat
    from megajoy.quant.fp8 import E4M3, fp8_round

    w = torch.randn(rows, cols, device=device) * 0.02
    gigabytes = w.numel() * 4 / 1e9
    # The floor: the fp32 weight read once and its fake-quantised copy written once, at copy bandwidth.
    floor = measure_floors(device, torch.float32).seconds(0, 2 * gigabytes * 1e9)
    baselines = _baselines(w)
    table = []
    for name in ("int4", "q4_0", "q8_0"):
        fmt = WeightFormat.of(name)
        seconds = time_call(lambda: fmt.fake_quant(w), device, warmup=1, iters=5)
        row = {"format": name, "megajoy GB/s": gigabytes / seconds, "x floor": seconds / floor}
        if name in baselines:
            label, fn = baselines[name]
            base = time_call(fn, device, warmup=1, iters=3)
            row.update({"baseline": label, "baseline GB/s": gigabytes / base, "speed-up": base / seconds})
        table.append(row)
    for recipe, blockwise in (("fp8 tensorwise", False), ("fp8 blockwise", True)):
        seconds = time_call(lambda: fp8_round(w, E4M3, blockwise, (128, 128)), device, warmup=1, iters=5)
        table.append({"format": recipe, "megajoy GB/s": gigabytes / seconds, "x floor": seconds / floor})
    return table


def fp8_step_speedup(device: torch.device) -> dict | None:
    """joyai-slice training step, bf16 autocast with and without FP8 GEMMs (GPU only)."""
    if device.type != "cuda":
        return None
    from megajoy.config import joyai_slice
    from megajoy.model import create_model
    from megajoy.quant.fp8 import Fp8Matmul
    from megajoy.quant.qat import set_fp8

    cfg = joyai_slice()
    model = create_model(cfg, device=device).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 4096), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, compute_mtp=False)
        out.lm_loss.backward()

    bf16 = time_call(step, device, warmup=2, iters=5)
    set_fp8(model, Fp8Matmul("tensorwise", "torch"))
    fp8 = time_call(step, device, warmup=2, iters=5)
    return {"bf16 step s": bf16, "fp8 tensorwise step s": fp8, "speed-up": bf16 / fp8}


def qat_rollout(device: torch.device, prompts: int, new_tokens: int, modules: str = "linear") -> dict:
    """Sampling from the tiny preset under INT4 QAT (RL's --rollout-qat): quantising in every decoding
    step's forward (the baseline) against once per rollout (megajoy.quant.formats.reuse_fake_quant), and
    without QAT, in one run; the sampled tokens must agree."""
    import contextlib

    from megajoy.config import tiny
    from megajoy.model import create_model
    from megajoy.model.generate import SamplingParams, generate
    from megajoy.quant.formats import WeightFormat, reuse_fake_quant
    from megajoy.quant.qat import set_qat

    cfg = tiny()
    model = create_model(cfg, device=device, seed=0).eval()
    ids = torch.randint(3, cfg.vocab_size, (prompts, 20), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(new_tokens, 1.0, seed=0)
    tokens = {}

    def sample(label, context):
        def run():
            with context():
                tokens[label] = generate(model, ids, params)
        return time_call(run, device, warmup=1, iters=3)

    plain = sample("no qat", contextlib.nullcontext)
    set_qat(model, WeightFormat.of("int4", 32), modules)
    every = sample("every step", contextlib.nullcontext)
    reused = sample("reused", reuse_fake_quant)
    return {"modules": modules, "prompts": prompts, "new tokens": new_tokens, "no qat s": plain,
            "quantised every step s": every, "reused s": reused, "speed-up": every / reused,
            "same tokens": tokens["every step"] == tokens["reused"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--rollout-prompts", type=int, default=16, help="QAT sampling: prompts (tiny preset)")
    parser.add_argument("--rollout-tokens", type=int, default=48, help="QAT sampling: new tokens per prompt")
    parser.add_argument("--out", default="benchmarks/results/quantization.json")
    args = parser.parse_args()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    table = quantisation_rows(args.rows, args.cols, device)
    print(f"fake-quant (quantise + dequantise) of a {args.rows} x {args.cols} fp32 weight on {device}:")
    print_table(table, ["format", "megajoy GB/s", "x floor", "baseline", "baseline GB/s", "speed-up"])
    step = fp8_step_speedup(device)
    print("FP8 training step: " + (str(step) if step else "no GPU here; run on a Hopper GPU for FP8 vs bf16"))
    rollout = qat_rollout(device, args.rollout_prompts, args.rollout_tokens)
    print(f"INT4 QAT sampling ({rollout['prompts']} prompts x {rollout['new tokens']} tokens, every projection): "
          f"quantised every step {rollout['quantised every step s']:.3f} s, once per rollout "
          f"{rollout['reused s']:.3f} s ({rollout['speed-up']:.2f}x), without QAT {rollout['no qat s']:.3f} s")
    write_json(args.out, {"benchmark": "quantization", "env": environment(device), "fake_quant": table,
                          "fp8_step": step, "qat_rollout": rollout})


if __name__ == "__main__":
    main()
