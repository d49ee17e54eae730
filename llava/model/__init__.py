"""LLaVA models; importing registers ``llava_llama`` with the transformers Auto classes."""

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM"]
