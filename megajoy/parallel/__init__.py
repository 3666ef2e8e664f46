"""The parallel core: rank grid, communication mappings, tensor / sequence / expert / data parallelism.
Device-agnostic: the same code runs on gloo (CPU) and NCCL (GPU)."""
