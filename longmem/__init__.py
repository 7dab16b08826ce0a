"""LongMem: a frozen causal LM, a long-term memory of its past keys/values, and a SideNet that reads it."""

from longmem.attention import joint_attention
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.io import __version__, verify_result
from longmem.loading import DEFAULT_MODEL, SMOLLM2_MODEL, TINY_MODEL, load_model, load_model_and_tokenizer
from longmem.memory import MemoryBank
from longmem.model import LongMem, LongMemOutput

__all__ = ["DEFAULT_MODEL", "SMOLLM2_MODEL", "TINY_MODEL", "LongMem", "LongMemConfig", "LongMemError", "LongMemOutput", "MemoryBank", "__version__",
           "joint_attention", "load_model", "load_model_and_tokenizer", "verify_result"]
