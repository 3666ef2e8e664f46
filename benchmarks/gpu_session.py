"""A lent GPU's checks and measurements, most wanted first, within a time budget.

A lent GPU comes with about 30 minutes of device time and at most 10 minutes per command, and stays warm
(its files with it) between commands. Run this once per command until it reports nothing left to do:

  python benchmarks/gpu_session.py --budget-s 540 --state /tmp/megajoy-gpu --out "$OUT"

Each call runs, in order, the checks the state folder does not yet record as done, each under its own
time limit; a check whose limit exceeds what the call's budget has left waits for the next call. A check's
output goes to <state>/<name>.log, the JSON its benchmarks write into <state>, its status (passed,
failed, timeout, skipped when a package it needs is missing), seconds and commands into
<state>/session.json; with --out, session.json and a gzipped tar of the whole state folder are copied
there. `--list` prints the plan; `--check-args` parses every benchmark command's flags without running
anything (the tests do this on CPU, so the plan cannot drift from the scripts' flags).
"""

import argparse
import importlib.util
import json
import os
import runpy
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ENVIRONMENT = """
import json, platform, subprocess, sys, datetime, torch
from importlib.metadata import PackageNotFoundError, version
info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}
for name in ("triton", "transformers", "torchtitan", "nvidia-ml-py"):
    try:
        info[name] = version(name)
    except PackageNotFoundError:
        info[name] = "not installed"
try:
    info["nvidia-smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    info["nvidia-smi"] = "not found"
print(json.dumps(info, indent=1))
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
"""


@dataclass
class Check:
    name: str
    why: str
    commands: list[list[str]]
    limit_s: int
    needs: tuple[str, ...] = field(default_factory=tuple)


def plan(state: str) -> list[Check]:
    py = sys.executable

    def script(name: str) -> str:
        return os.path.join(HERE, name)

    def out(name: str) -> str:
        return os.path.join(state, name)

    step = ["--preset", "joyai-slice", "--batch", "1", "--seq-length", "4096", "--accumulate", "8"]
    # megajoy info's plan for the throughput step's model and optimizer (no MTP, torch's AdamW), beside its
    # measured peak memory
    plan = [py, "-m", "megajoy", "info", "--preset", "joyai-slice", "--dp", "1", "--micro-batch-size", "1",
            "--global-batch-size", "8", "--set", "model.num_nextn_predict_layers=0", "--optimizer", "adamw", "--json"]
    selective = "--recompute-granularity selective --recompute-modules"
    return [
        Check("env", "device, driver and versions for RESULTS.md", [[py, "-c", ENVIRONMENT, out("env.json")]], 60),
        Check("gpu-tests", "the kernels against their torch references; the GPU-only branches (fused AdamW resume, "
              "FP8 at odd token counts, bf16 weights with the fast paths)",
              [[py, "-m", "pytest", "-q", "tests/test_kernels.py"],
               [py, "-m", "pytest", "-q", "tests/test_parallel_units.py", "tests/test_master_weights.py",
                "tests/test_quant.py", "-k", "adamw_state or on_gpu or 40_tokens or fp8_emulation"]], 420),
        Check("moe-ep8", "the MoE layer at one GPU's EP-8 share, fp32 masters and bf16 weights (goal: 60% of the "
              "dense bf16 matmul rate)",
              [[py, script("moe_dispatch.py"), "--shape", "joyai-ep8", "--out", out("moe_dispatch_joyai_ep8.json")]], 300),
        Check("step-bf16", "joyai-slice steps, fp32 masters and bf16 weights, eager and compiled (goal: 45% MFU); "
              "the planner's numbers for both beside their peak memory",
              [[py, script("throughput.py"), *step, "--params-dtype", "bf16", "--compile", "--no-hf",
                "--out", out("throughput_bf16")], plan, [*plan, "--params-dtype", "bf16"]], 540),
        Check("hot-paths", "every hot path against its floor and the torch reference (the fused SwiGLU and router "
              "are new)",
              [[py, script("run_all.py"), "--results", state]], 480),
        Check("torchtitan", "TorchTitan's DeepSeek-V3 beside megajoy on the same configuration",
              [[py, script("throughput.py"), *step, "--compile", "--no-hf", "--torchtitan",
                "--out", out("throughput_torchtitan")]], 540, needs=("torchtitan",)),
        Check("qat-step", "the trainer with int4 QAT, weights quantised once per step",
              [[py, script("throughput.py"), *step, "--layout", "", "--layout", "--qat int4",
                "--out", out("throughput_qat")]], 480),
        Check("recompute", "activation recomputation's cost, and its peak memory against the plan",
              [[py, script("throughput.py"), *step, "--layout", "", "--layout",
                f"{selective} moe_act layernorm mla_up_proj", "--layout", f"{selective} moe",
                "--layout", "--recompute-granularity full", "--out", out("throughput_recompute")]], 540),
        Check("quantization", "fake-quant passes and QAT rollouts",
              [[py, script("quantization.py"), "--out", out("quantization.json")]], 240),
        Check("newton-schulz", "Muon's Newton-Schulz per rank and step",
              [[py, script("newton_schulz.py"), "--out", out("newton_schulz.json")]], 240),
        Check("moe-joyai", "the MoE layer with all 256 experts on one GPU",
              [[py, script("moe_dispatch.py"), "--shape", "joyai", "--out", out("moe_dispatch_joyai.json")]], 300),
    ]


class _Parsed(Exception):
    pass


def check_arguments(checks: list[Check]) -> list[str]:
    """Each benchmark command's flags through its own script's parser, stopped right after parsing: the
    problems found (empty when every command parses)."""
    problems, original = [], argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        for check in checks:
            for command in check.commands:
                if command[1].startswith(HERE):
                    name, flags, run = os.path.basename(command[1]), command[2:], lambda: runpy.run_path(
                        command[1], run_name="__main__")
                elif command[1:3] == ["-m", "megajoy"]:
                    name, flags, run = "megajoy", command[3:], lambda: runpy.run_module("megajoy", run_name="__main__")
                else:
                    continue  # python -c / -m pytest: nothing of ours to parse
                saved = sys.argv
                sys.argv = [name, *flags]
                try:
                    run()
                    problems.append(f"{check.name}: {name} ran without parsing its flags")
                except _Parsed:
                    pass
                except SystemExit as e:  # argparse's error exit, its message already on stderr
                    problems.append(f"{check.name}: {name} {flags} refused (exit {e.code})")
                finally:
                    sys.argv = saved
    finally:
        argparse.ArgumentParser.parse_args = original
    return problems


def run_check(check: Check, state: str) -> dict:
    missing = [m for m in check.needs if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "why": f"missing {', '.join(missing)}", "seconds": 0.0}
    started, codes, status = time.perf_counter(), [], "passed"
    with open(os.path.join(state, f"{check.name}.log"), "w") as log:
        for command in check.commands:
            remaining = check.limit_s - (time.perf_counter() - started)
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            try:
                done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(remaining, 1),
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except subprocess.TimeoutExpired:
                codes.append(None)
                status = "timeout"
                break
            codes.append(done.returncode)
            if done.returncode != 0:
                status = "failed"
    return {"status": status, "exit_codes": codes, "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=540, help="wall seconds this call may use")
    parser.add_argument("--state", default="/tmp/megajoy-gpu", help="folder that remembers what is done")
    parser.add_argument("--out", default=None, help="where to copy session.json and the state folder's tarball")
    parser.add_argument("--only", nargs="+", default=None, help="these checks only (names as --list prints them)")
    parser.add_argument("--again", nargs="+", default=[], help="run these checks even if recorded as done")
    parser.add_argument("--list", action="store_true", help="print the plan and stop")
    parser.add_argument("--check-args", action="store_true", help="parse every benchmark command's flags and stop")
    args = parser.parse_args(argv)
    checks = plan(os.path.abspath(args.state))
    names = [c.name for c in checks]
    unknown = sorted(set((args.only or []) + args.again) - set(names))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; the plan has {names}")
    if args.list:
        for c in checks:
            print(f"{c.name:14} {c.limit_s:4d} s  {c.why}")
        return 0
    if args.check_args:
        problems = check_arguments(checks)
        print("\n".join(problems) or "every benchmark command's flags parse")
        return 1 if problems else 0

    os.makedirs(args.state, exist_ok=True)
    record_path = os.path.join(args.state, "session.json")
    record = {}
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    deadline = time.perf_counter() + args.budget_s
    for check in checks:
        if (args.only and check.name not in args.only) or (check.name in record and check.name not in args.again):
            continue
        left = deadline - time.perf_counter()
        if left < check.limit_s:
            print(f"[{check.name}: waits for the next call ({check.limit_s} s limit, {left:.0f} s left)]", flush=True)
            continue
        result = run_check(check, args.state)
        record[check.name] = {**result, "commands": check.commands}
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"[{check.name}: {result['status']}, {result['seconds']} s]", flush=True)
    pending = [n for n in names if n not in record and (not args.only or n in args.only)]
    print("nothing left to do" if not pending else f"left for the next call: {pending}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "session.json"), "w") as f:
            json.dump(record, f, indent=1)
        with tarfile.open(os.path.join(args.out, "gpu_session.tar.gz"), "w:gz") as tar:
            tar.add(args.state, arcname="gpu_session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
