"""Every hot-path benchmark in turn (each its own process), then one markdown summary of their tables.

  python benchmarks/run_all.py                      # CPU: small shapes, fp32
  python benchmarks/run_all.py --shape joyai        # a GPU: JoyAI shapes, bf16

Writes benchmarks/results/<name>.json per script and benchmarks/results/summary.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import markdown_table, present_columns  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HOT_PATHS = ["moe_permute", "router", "rmsnorm", "rope", "swiglu", "attention", "cross_entropy"]


def markdown(name: str, payload: dict) -> list[str]:
    floors, env, rows = payload["floors"], payload["env"], payload["rows"]
    return [f"### {name}", "", f"{env.get('gpu', env['cpu'])}, {floors['dtype']}, torch {env['torch']}, "
            f"{env['date']}; ceilings in this run: matmul {floors['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, "
            f"copy {floors['copy_bytes_per_s'] / 1e9:.4g} GB/s", "", *markdown_table(rows, present_columns(rows)), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "joyai"], default=None)
    parser.add_argument("--only", nargs="+", choices=HOT_PATHS, default=HOT_PATHS)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    summary = []
    for name in args.only:
        out = os.path.join(args.results, f"{name}.json")
        command = [sys.executable, os.path.join(HERE, f"{name}.py"), "--out", out]
        if args.shape:
            command += ["--shape", args.shape]
        started = time.perf_counter()
        done = subprocess.run(command)
        print(f"[{name}: exit {done.returncode}, {time.perf_counter() - started:.0f} s]", flush=True)
        if done.returncode == 0:
            with open(out) as f:
                summary += markdown(name, json.load(f))
        else:
            summary += [f"### {name}", "", f"failed (exit {done.returncode})", ""]
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write("\n".join(summary))


if __name__ == "__main__":
    main()
