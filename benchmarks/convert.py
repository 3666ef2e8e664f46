"""Checkpoint conversion: wall time and peak memory of tools/convert_ckpt.py on a synthetic
DeepSeek-V3-shaped checkpoint, beside llama.cpp's own convert_hf_to_gguf.py on the same Hugging Face
directory (when its source can be had), and a tensor-by-tensor comparison of the two GGUF files.

  python benchmarks/convert.py                      # 2.3B parameters, bf16 (about 30 GB of scratch disk)
  python benchmarks/convert.py --size small         # a 0.2B model, for a quick look

Every conversion runs in its own process; peak memory is that process's maximum resident set size.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, print_table, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = [sys.executable, os.path.join(ROOT, "tools", "convert_ckpt.py")]
SIZES = {
    "2b": dict(vocab_size=32768, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024,
               num_hidden_layers=6, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64,
               qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=4,
               max_position_embeddings=4096),
    "small": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                  num_hidden_layers=4, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                  qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4,
                  max_position_embeddings=4096),
}


class SyntheticStore:
    """Deterministic bf16 values for every tensor of a config, produced row range by row range (a fixed
    row pattern plus a per-row, per-tensor offset), so a checkpoint of any size can be written in
    bounded memory and any part of it recomputed for comparison."""

    def __init__(self, cfg):
        from megajoy.model.stats import meta_model

        self.meta = meta_model(cfg).state_dict()
        self.weight_map = dict.fromkeys(self.meta, "synthetic")

    def shape(self, name):
        return tuple(self.meta[name].shape)

    def load(self, name):
        return self.load_rows(name, 0, self.meta[name].shape[0])

    def load_rows(self, name, start, stop):
        row = self.meta[name][0].numel()
        pattern = torch.arange(row, dtype=torch.float32).remainder_(251).mul_(0.01)
        offsets = (torch.arange(start, stop, dtype=torch.float32) + sum(map(ord, name))).remainder_(97).mul_(0.001)
        return (pattern + offsets[:, None]).to(torch.bfloat16).view(stop - start, *self.meta[name].shape[1:])


def write_synthetic(directory: str, cfg, tokenizer: str | None) -> int:
    """A megajoy model directory (bf16) of synthetic weights; returns the parameter count."""
    from megajoy.ckpt.native import save_model_dir
    from megajoy.ckpt.view import MegajoyView
    from megajoy.config import JobConfig

    store = SyntheticStore(cfg)
    save_model_dir(directory, MegajoyView(JobConfig(model=cfg), store, tokenizer, "synthetic"), torch.bfloat16)
    return sum(t.numel() for t in store.meta.values())


# A forked child starts with its parent's peak RSS on Linux (exec folds the old address space's high-water
# mark into the process's maxrss), so ru_maxrss would report the larger of the two. The address space
# exec creates has its own high-water mark, VmHWM, which the child reports itself as it exits.
PEAK_RUNNER = """
import runpy, sys
report, target = sys.argv.pop(1), sys.argv.pop(1)
try:
    if target == "-c":
        code = sys.argv.pop(1)
        sys.argv[0] = "-c"
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv[0] = target
        runpy.run_path(target, run_name="__main__")
finally:
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def run_measured(command: list[str]) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS in MB) of a Python command (`[sys.executable, script | -c
    code, args...]`) run in a child process."""
    assert command[0] == sys.executable
    with tempfile.NamedTemporaryFile(suffix=".peak") as report:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", PEAK_RUNNER, report.name, *command[1:]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode:
            sys.stderr.write(result.stderr[-4000:])
        seconds = time.perf_counter() - start
        with open(report.name) as f:
            peak_kb = int(f.read() or 0)
    return result.returncode, seconds, peak_kb / 1024


def same_gguf_tensors(a: str, b: str) -> tuple[int, list[str]]:
    """(tensors compared, names whose type or bytes differ) between two GGUF files."""
    import numpy as np
    from gguf import GGUFReader

    ours = {t.name: t for t in GGUFReader(a).tensors}
    theirs = {t.name: t for t in GGUFReader(b).tensors}
    differ = sorted(set(ours) ^ set(theirs))
    for name in set(ours) & set(theirs):
        x, y = ours[name], theirs[name]
        if x.tensor_type != y.tensor_type or not np.array_equal(np.asarray(x.data).reshape(-1),
                                                                np.asarray(y.data).reshape(-1)):
            differ.append(name)
    return len(ours), differ


def small_tokenizer(path: str) -> str:
    from megajoy.data.tokenizer import train_bpe

    words = "the a model token layer expert router reads writes routes trains on under over with".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    train_bpe(docs, 300, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="2b")
    parser.add_argument("--gguf-types", default="f16,q8_0")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's converter")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "convert.json"))
    args = parser.parse_args(argv)

    from megajoy.config import ModelConfig

    work = args.workdir or tempfile.mkdtemp(prefix="megajoy-convert-")
    os.makedirs(work, exist_ok=True)
    paths = {k: os.path.join(work, k) for k in ("src", "hf", "back")}
    cfg = ModelConfig(**SIZES[args.size])
    start = time.perf_counter()
    params = write_synthetic(paths["src"], cfg, small_tokenizer(os.path.join(work, "tokenizer.json")))
    print(f"synthetic checkpoint: {params / 1e9:.2f}B parameters, bf16, written in "
          f"{time.perf_counter() - start:.0f} s")
    rows = []

    def measure(tool, what, command):
        status, seconds, peak = run_measured(command)
        if status != 0:
            raise SystemExit(f"{tool} {what} failed with status {status}")
        rows.append({"tool": tool, "conversion": what, "seconds": seconds, "peak_rss_mb": peak})
        print_table(rows[-1:], ["tool", "conversion", "seconds", "peak_rss_mb"])

    try:
        measure("megajoy", "megajoy -> hf (bf16)", TOOL + ["--input", paths["src"], "--output", paths["hf"], "--to", "hf"])
        measure("megajoy", "hf -> megajoy (bf16)",
                TOOL + ["--input", paths["hf"], "--output", paths["back"], "--to", "megajoy", "--dtype", "bf16"])
        shutil.rmtree(paths["back"])
        script = None
        if not args.no_llama_cpp:
            from benchmarks.llama_cpp_reference import converter_command, converter_path

            try:
                script = converter_path()
            except (subprocess.CalledProcessError, OSError) as e:
                print(f"llama.cpp's converter is not available ({e}); measuring megajoy alone")
        for gguf_type in args.gguf_types.split(","):
            ours = os.path.join(work, f"megajoy_{gguf_type}.gguf")
            measure("megajoy", f"hf -> gguf {gguf_type}", TOOL + ["--input", paths["hf"], "--output", ours, "--to",
                                                                  "gguf", "--gguf-type", gguf_type])
            if script:
                theirs = os.path.join(work, f"llama_cpp_{gguf_type}.gguf")
                measure("llama.cpp convert_hf_to_gguf.py", f"hf -> gguf {gguf_type}",
                        converter_command(paths["hf"], theirs, gguf_type, script))
                compared, differ = same_gguf_tensors(ours, theirs)
                rows[-1]["tensors_identical"] = f"{compared - len(differ)}/{compared}"
                print(f"  tensors byte-identical: {compared - len(differ)} of {compared}")
                os.remove(theirs)
            os.remove(ours)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    env = environment(torch.device("cpu"))
    env["cpu_count"] = os.cpu_count()
    write_json(args.out, {"environment": env, "size": args.size, "parameters": params, "results": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
