"""Batches from a token memmap: random windows for training, every window in order for evaluation.

The training sampler draws offsets from its own `torch.Generator`, whose state is saved in checkpoints: that
state *is* the data position, so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from nanophi.errors import UserError


class BatchLoader:
    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        assert 0 <= rank < world_size, f"rank {rank} outside a world of {world_size} processes"
        if len(tokens) < block_size + 1:
            raise UserError(
                f"the training split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a bigger corpus or a smaller --block-size"
            )
        self.tokens, self.block_size, self.batch_size, self.device = tokens, block_size, batch_size, device
        # Data-parallel ranks share one generator: each draws the global batch's offsets (batch_size *
        # world_size rows) and keeps its own slice, so N processes at batch B see exactly the rows one process
        # at batch N*B sees, and every rank's sampler state is the same (one state to checkpoint).
        self.rank, self.world_size = rank, world_size
        self.gen = torch.Generator().manual_seed(seed)
        self._arange = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (B, T) int64; y is x shifted left by one token."""
        B = self.batch_size
        offsets = torch.randint(len(self.tokens) - self.block_size, (B * self.world_size,), generator=self.gen)
        offsets = offsets[self.rank * B : (self.rank + 1) * B]
        rows = self.tokens[offsets.numpy()[:, None] + self._arange]  # (B, T+1) one gather from the memmap
        buf = torch.from_numpy(rows.astype(np.int64))
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)
        return buf[:, :-1], buf[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(state["generator"])


def eval_batches(
    tokens: np.ndarray, block_size: int, batch_size: int, device: torch.device, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cover the split with non-overlapping windows so every token after the first is scored exactly once.

    The tail that does not fill a window is scored by one last window aligned to the end, with the targets
    already scored masked out (-1). With `max_batches`, windows are spread evenly over the split."""
    n = len(tokens)
    if n < 2:
        raise UserError("the validation split has fewer than 2 tokens; use a bigger corpus or --val-fraction")
    T = min(block_size, n - 1)
    starts = list(range(0, n - 1 - T + 1, T))
    last_scored = starts[-1] + T  # targets up to this index are covered
    tail_start = None
    if last_scored < n - 1:
        tail_start = n - 1 - T
    windows = [(s, 0) for s in starts]
    if tail_start is not None:
        windows.append((tail_start, last_scored - tail_start))  # mask targets already scored
    if max_batches is not None and len(windows) > max_batches * batch_size:
        pick = np.linspace(0, len(windows) - 1, max_batches * batch_size).round().astype(int)
        windows = [windows[i] for i in sorted(set(pick))]
    arange = np.arange(T + 1)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        rows = tokens[np.array([s for s, _ in chunk])[:, None] + arange].astype(np.int64)
        buf = torch.from_numpy(rows)
        x, y = buf[:, :-1].clone(), buf[:, 1:].clone()
        for j, (_, masked) in enumerate(chunk):
            y[j, :masked] = -1
        yield x.to(device), y.to(device)
