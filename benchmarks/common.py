"""Shared benchmark plumbing: timing with device synchronisation, the machine's two ceilings (matmul
rate and copy bandwidth, measured in the same run), floor ratios, a printed table, JSON results."""

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import date

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def time_op(fn, device: torch.device) -> float:
    """Median seconds per call. On a GPU: Triton's do_bench (CUDA events, L2 flushed between calls)
    where Triton is installed; on a CPU, the host clock over a few calls."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
        except ImportError:
            return time_call(fn, device, warmup=3, iters=30)
    return time_call(fn, device, warmup=2, iters=7)


@dataclass
class Floors:
    """The two ceilings every hot path is held against, measured on this machine in this run."""

    matmul_flops_per_s: float  # a large square matmul in the benchmark's dtype
    copy_bytes_per_s: float  # a large device-to-device copy, bytes read plus bytes written
    dtype: str

    def seconds(self, flops: float, bytes_moved: float) -> float:
        """The floor: the larger of arithmetic time and memory time."""
        return max(flops / self.matmul_flops_per_s, bytes_moved / self.copy_bytes_per_s)


def measure_floors(device: torch.device, dtype: torch.dtype) -> Floors:
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = 2 * n ** 3 / time_op(lambda: a @ b, device)
    elements = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB or 64 MiB of fp32
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * src.element_size() / time_op(lambda: dst.copy_(src), device)
    return Floors(matmul, copy, str(dtype).replace("torch.", ""))


def bench_row(case: str, seconds: float, flops: float, bytes_moved: float, floors: Floors,
              baseline_seconds: float | None = None, **extra) -> dict:
    """One table row: time, achieved rates, the floor and how far above it, the baseline's time."""
    floor = floors.seconds(flops, bytes_moved)
    row = {"case": case, "ms": seconds * 1e3, "TFLOP/s": flops / seconds / 1e12 if flops else None,
           "GB/s": bytes_moved / seconds / 1e9 if bytes_moved else None, "floor ms": floor * 1e3,
           "x floor": seconds / floor if floor else None}
    if baseline_seconds is not None:
        row.update({"baseline ms": baseline_seconds * 1e3, "speed-up": baseline_seconds / seconds})
    return row | extra


BENCH_COLUMNS = ["case", "ms", "TFLOP/s", "GB/s", "floor ms", "x floor", "baseline ms", "speed-up", "peak GB"]


def present_columns(rows: list[dict]) -> list[str]:
    """The hot-path columns some row has a value for."""
    return [c for c in BENCH_COLUMNS if any(r.get(c) is not None for r in rows)]


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    """A markdown table's lines; floats to four significant digits, missing cells blank."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return lines


def print_profile(fn, device: torch.device) -> None:
    """One more call of `fn` under torch.profiler: the ops that took the most device (or CPU) time."""
    import sys

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), file=sys.stderr)


def hot_path_args(description: str, name: str) -> argparse.Namespace:
    """The flags every hot-path script takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=["small", "joyai"], default=None,
                        help="problem size (default: joyai on a GPU, small on a CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      f"{name}.json"))
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.shape = args.shape or ("joyai" if args.device.type == "cuda" else "small")
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return args


def report(name: str, title: str, rows: list[dict], args, floors: Floors, **extra) -> None:
    """Print the table (with the ceilings it is held against) and write the JSON."""
    print(f"{title} ({args.shape}, {floors.dtype}, {args.device}); ceilings measured in this run: matmul "
          f"{floors.matmul_flops_per_s / 1e12:.3g} TFLOP/s, copy {floors.copy_bytes_per_s / 1e9:.4g} GB/s")
    print_table(rows, present_columns(rows))
    write_json(args.out, {"benchmark": name, "shape": args.shape, "env": environment(args.device),
                          "floors": asdict(floors), "rows": rows, **extra})


def environment(device: torch.device) -> dict:
    info = {"date": date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
