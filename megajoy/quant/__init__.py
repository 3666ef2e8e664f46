"""Quantisation: weight fake-quant for quantisation-aware training (INT4 and ggml's Q4_0 / Q8_0 grids),
FP8 GEMMs, and the packed INT4 export."""
