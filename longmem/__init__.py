"""LongMem: a frozen causal LM, a long-term memory of its past keys/values, and a SideNet that reads it."""
from longmem.attention import joint_attention
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.loading import load_model
from longmem.memory import MemoryBank
from longmem.model import LongMem, LongMemOutput

__all__ = ["LongMem", "LongMemConfig", "LongMemError", "LongMemOutput", "MemoryBank", "joint_attention", "load_model"]
__version__ = "0.1.0"
