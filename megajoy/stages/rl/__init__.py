"""Reinforcement learning: policy losses (FiberPO, GRPO, GSPO, PPO-clip)."""
