"""Data: Megatron indexed datasets, packing, tokenizers, chat / preference / RL formats."""
