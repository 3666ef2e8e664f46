"""megajoy: Megatron-style 3D-parallel training for JoyAI-LLM-Flash-class MoE models."""

__version__ = "0.1.0"
