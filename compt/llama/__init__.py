"""The LLaMA family (transformers' LlamaForCausalLM): model configs, building models, and
growing a trained model into a larger config (``compt.llama.grow``).
"""
from compt.llama.model import build_llama, llama_config_problem, llama_state_shapes, resolve_llama_config

__all__ = ["build_llama", "llama_config_problem", "llama_state_shapes", "resolve_llama_config"]
