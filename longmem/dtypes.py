"""The one map from dtype names to torch dtypes: the CLI's ``--dtype`` (fp32, bf16, fp16), checkpoints and
memory files (float32, bfloat16, float16), the harness's model arguments."""

from __future__ import annotations

import torch

from longmem.errors import LongMemError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    """``"bf16"``, ``"fp32"``, ``"fp16"`` (or their torch names, or a torch.dtype) -> torch.dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise LongMemError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[str(dtype).lower()]
