"""Model FLOPs utilisation for the training log: model FLOPs per token (counted as `megajoy info` counts
them, recomputation not included) times tokens/s, over the devices' dense peak rate."""

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s, matched against
# torch.cuda.get_device_name in this order (the first name found in it wins, so longer names come first).
BF16_PEAK_TFLOPS = (
    ("GH200", 989.4), ("GB200", 2500.0), ("B200", 2250.0),
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0),
    ("MI325X", 1307.4), ("MI300X", 1307.4), ("MI250X", 383.0),
)


def peak_flops_per_s(device: torch.device, bf16: bool, peak_tflops: float | None) -> float | None:
    """The per-device peak MFU is measured against: `peak_tflops` when given; for a known GPU computing in
    bf16, its data-sheet figure; otherwise None (no MFU: CPUs, fp32 on GPUs, unknown devices)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    tflops = bf16_peak_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def bf16_peak_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in device_name), None)


def throughput_metrics(flops: float, seconds: float, devices: int, peak: float | None) -> dict:
    """Megatron's `--log-throughput` figure (model TFLOP/s per device) and, with a known peak, MFU."""
    per_device = flops / max(seconds, 1e-9) / devices
    out = {"tflops_per_gpu": per_device / 1e12}
    if peak is not None:
        out["mfu"] = per_device / peak
    return out
