"""A preallocated key/value cache for batched generation with prompts of different lengths.

Prompts are left-padded to a common length, so every row writes its next token into the same slot and decoding
is one (B, 1) forward per step. Each row remembers how many pad slots it starts with; the attention mask hides
them and the positions (for RoPE or learned embeddings) start at 0 on the row's first real token.

The buffers are allocated once, (n_layer, B, n_kv_head, max_len, head_dim), and `update` returns views of the
filled part, so a decode step allocates nothing for the cache. The positions and the mask depend only on how
far the cache is filled, so each is built once per forward and shared by all layers.
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
        self.padded = bool(self.pad.any())
        self._memo: dict[tuple[str, int, int], torch.Tensor | None] = {}

    @property
    def free(self) -> int:
        return self.max_len - self.pos

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T slots for each row, counted from the row's first real token. (B, T)"""
        key = ("positions", self.pos, T)
        if key not in self._memo:
            slots = torch.arange(self.pos, self.pos + T, device=self.pad.device)
            self._memo[key] = (slots[None, :] - self.pad[:, None]).clamp_(min=0)
        return self._memo[key]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) into the next T slots; return all filled slots (B, nkv, pos+T, hs)."""
        T = k.size(2)
        assert self.pos + T <= self.max_len, f"KV cache overflow: {self.pos}+{T} > {self.max_len}"
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, S) additive mask (0 or -inf, in the cache's dtype) for the T new queries over S = pos + T
        keys: causal and pad-aware. None when nothing needs hiding: one new query per row and no padding.

        A pad query may attend only itself: its output is never used, but an all-masked row would make
        softmax produce NaN."""
        key = ("mask", self.pos, T)
        if key not in self._memo:
            if T == 1 and not self.padded:
                self._memo[key] = None
            else:
                S = self.pos + T
                q = torch.arange(self.pos, S, device=self.pad.device)[:, None]  # (T, 1) absolute slot of each query
                kk = torch.arange(S, device=self.pad.device)[None, :]  # (1, S)
                causal = kk <= q  # (T, S)
                not_pad = kk[None] >= self.pad[:, None, None]  # (B, 1, S)
                allowed = ((causal[None] & not_pad) | (kk == q)[None])[:, None]  # (B, 1, T, S)
                mask = torch.zeros(allowed.shape, dtype=self.k.dtype, device=self.pad.device)
                self._memo[key] = mask.masked_fill_(~allowed, float("-inf"))
        return self._memo[key]

    def advance(self, T: int) -> None:
        self.pos += T
        self._memo.clear()  # positions and masks of the previous step are never asked for again

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows dropped); one copy of the cache."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.pad = self.pad[rows]
        self.padded = bool(self.pad.any())
        self._memo.clear()
