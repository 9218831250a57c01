"""A preallocated key/value cache for batched generation with prompts of different lengths.

Prompts are left-padded to a common length, so every row writes its next token into the same slot and decoding
is one (B, 1) forward per step. Each row remembers how many pad slots it starts with; the attention mask hides
them and the positions (for RoPE or learned embeddings) start at 0 on the row's first real token.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        pad: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # slots filled so far (the same for every row)
        self.pad = (pad if pad is not None else torch.zeros(batch_size, dtype=torch.long)).to(device)  # (B,)

    @property
    def free(self) -> int:
        return self.max_len - self.pos

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T slots for each row, counted from the row's first real token. (B, T)"""
        slots = torch.arange(self.pos, self.pos + T, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp_(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) into the next T slots; return all filled slots (B, nkv, pos+T, hs)."""
        T = k.size(2)
        assert self.pos + T <= self.max_len, f"KV cache overflow: {self.pos}+{T} > {self.max_len}"
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def attn_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool mask for the T new queries over S = pos + T keys: causal and pad-aware.

        A pad query may attend only itself: its output is never used, but an all-False row would make
        softmax produce NaN."""
        S = self.pos + T
        q = torch.arange(self.pos, S, device=self.pad.device)[:, None]  # (T, 1) absolute slot of each query
        kk = torch.arange(S, device=self.pad.device)[None, :]  # (1, S)
        causal = kk <= q  # (T, S)
        not_pad = kk[None] >= self.pad[:, None, None]  # (B, 1, S)
        return ((causal[None] & not_pad) | (kk == q)[None])[:, None]  # (B, 1, T, S)

    def advance(self, T: int) -> None:
        self.pos += T
