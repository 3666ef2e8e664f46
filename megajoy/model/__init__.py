"""The JoyAI-Flash / DeepSeek-V3-family model: MLA attention, dense and MoE FFNs, the dense MTP module."""

from megajoy.model.transformer import CausalLMOutput, JoyAIForCausalLM, SequenceInfo, create_model

__all__ = ["CausalLMOutput", "JoyAIForCausalLM", "SequenceInfo", "create_model"]
