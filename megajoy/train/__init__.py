"""The one training loop every stage runs (pretrain, SFT, DPO, RL), its checkpoints and its metrics."""
