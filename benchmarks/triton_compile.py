"""Every megajoy Triton kernel compiled for a GPU architecture without a GPU: Triton's own front end and
NVIDIA's ptxas (both ship in the triton wheel), at the shapes and dtypes a JoyAI step launches them with.
Each kernel's launcher runs on CPU tensors with Triton's driver pointed at the target; launches only
compile. Reports registers per thread, spilled bytes and shared memory per kernel (cuobjdump's resource
usage), so a kernel that would not compile, or would spill, shows before a GPU is lent. Triton's
interpreter (how the tests run the kernels' numerics on CPU) compiles nothing, so it cannot show either.

  python benchmarks/triton_compile.py [--arch 90] [--json out.json]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


class _CompileOnlyDriver:
    """What JITFunction.run asks the active driver for, answered for a GPU that is not there."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_launches(launch) -> list:
    """The kernels `launch()` would launch, compiled for the active driver's target instead of run:
    [(name, CompiledKernel)]."""
    compiled, run = [], JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}", kernel))
        return kernel

    JITFunction.run = compile_only
    try:
        launch()
    finally:
        JITFunction.run = run
    return compiled


def resources(cubin: bytes) -> dict:
    """Registers, spilled (local) bytes and shared memory of a cubin's one kernel, from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"(REG|LOCAL|SHARED):(\d+)", text))
    return {"registers": int(usage["REG"]), "spilled bytes": int(usage["LOCAL"]), "shared bytes": int(usage["SHARED"])}


def joyai_launches(multiprocessors: int):
    """(case, launcher) for every Triton kernel at JoyAI's widths (hidden 2048, q / kv latents 1536 / 512,
    expert intermediate 768, 256 experts, top-8, 16 query heads and the one shared key of 64-wide rope) in
    the dtypes a step runs them with: fp32, bf16 (--params-dtype bf16), and RMSNorm's bf16 input with fp32
    weight and output (a latent norm under autocast over fp32 weights). Inputs are left uninitialised:
    nothing runs. Row counts are not compile-time constants, except the RMSNorm backward's band of tiles
    per program, which follows the rows (16,384 here) and the GPU's multiprocessors."""
    from megajoy.kernels import moe_permute_triton, rmsnorm_triton, rope_triton, router_triton, swiglu_triton

    rmsnorm_triton._multiprocessors = lambda device: multiprocessors
    for x_dtype, w_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                             (torch.bfloat16, torch.float32)):
        for width in (2048, 1536, 512):
            x, w, rstd = torch.empty(16384, width, dtype=x_dtype), torch.empty(width, dtype=w_dtype), torch.empty(16384)
            dy = torch.empty(16384, width, dtype=w_dtype)
            yield f"rmsnorm {width} {_name(x_dtype)} x {_name(w_dtype)} w", lambda x=x, w=w, rstd=rstd, dy=dy: (
                rmsnorm_triton.forward(x, w, 1e-6, w.dtype), rmsnorm_triton.backward(dy, x, w, rstd))
    rows = 48
    for dtype in DTYPES:
        name = _name(dtype)
        gate_up = torch.empty(rows, 2 * 768, dtype=dtype)
        yield f"swiglu 768 {name}", lambda g=gate_up: (
            swiglu_triton.forward(g[:, :768], g[:, 768:]),
            swiglu_triton.backward(g[:, :768], g[:, 768:], g[:, :768].contiguous(), g[:, :768], g[:, 768:]))
        cos = torch.empty(2, rows, 32)
        for heads in (16, 1):
            q = torch.empty(2, rows, heads, 64, dtype=dtype)
            yield f"rope {heads} heads {name}", lambda q=q, cos=cos: (rope_triton.rotate(q, cos, cos, False),
                                                                     rope_triton.rotate(q, cos, cos, True))
        src = torch.empty(rows, 2048, dtype=dtype)
        ids = torch.zeros(rows // 8, 8, dtype=torch.int64)
        weights = torch.empty(rows // 8, 8)
        yield f"permute 2048 top-8 {name}", lambda s=src, i=ids, w=weights: (
            moe_permute_triton.gather_rows(s, i.flatten()), moe_permute_triton.gather_rows(s, i.flatten(), w.flatten()),
            moe_permute_triton.gather_sum(s, i, w), moe_permute_triton.gather_sum(s, i, None),
            moe_permute_triton.row_dots(s[: rows // 8], i, s))
    logits = torch.empty(rows, 256)
    for normalise in (True, False):
        yield f"router 256 experts top-8{'' if normalise else ', unnormalised'}", \
            lambda normalise=normalise: _router(router_triton, logits, normalise)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _router(router_triton, logits, normalise: bool):
    ids = torch.zeros(logits.shape[0], 8, dtype=torch.int64)
    router_triton.forward(logits, torch.zeros(256), 8, 2.5, normalise)
    weights = torch.empty(logits.shape[0], 8)
    router_triton.backward(logits, ids, weights, weights, None, 2.5, normalise)
    router_triton.backward(logits, ids, weights, weights, logits, 2.5, normalise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100 / H200)")
    parser.add_argument("--multiprocessors", type=int, default=132, help="the GPU's SMs (132: H100 SXM)")
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args()
    triton.runtime.driver.set_active(_CompileOnlyDriver(args.arch))  # this process never launches a kernel
    rows = []
    for case, launch in joyai_launches(args.multiprocessors):
        for kernel_name, kernel in compile_launches(launch):
            rows.append({"case": case, "kernel": kernel_name, "warps": kernel.metadata.num_warps,
                         **resources(kernel.asm["cubin"])})
            print("  ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    print(f"{len(rows)} launches compiled for sm_{args.arch} with Triton {triton.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
