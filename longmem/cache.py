"""A key/value cache for incremental decoding: the local window's keys and values, per layer.

One object per network (backbone or SideNet), passed explicitly into ``forward``; shapes
(B, Hkv, S, Dh) with S the tokens already in the local window. ``raw_keys`` keeps the pre-rotary
keys of the layers that need them (block m, whose keys go to memory when the window slides).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.raw_keys: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        """S: tokens in the window (0 when empty)."""
        k = next((k for k in self.keys if k is not None), None)
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_raw: torch.Tensor | None = None):
        """Append this step's (B, Hkv, t, Dh) keys/values; return the whole window's."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
            if k_raw is not None:
                k_raw = torch.cat([self.raw_keys[layer], k_raw], dim=2)
        self.keys[layer], self.values[layer] = k, v
        if k_raw is not None:
            self.raw_keys[layer] = k_raw
        return k, v

    def reset(self) -> None:
        n = len(self.keys)
        self.keys, self.values, self.raw_keys = [None] * n, [None] * n, [None] * n
