"""Thin stage drivers over the one training loop: pretrain, sft, dpo, rl."""
