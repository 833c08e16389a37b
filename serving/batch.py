"""The running rows of one weight group: one KV cache, left-padded, and one attention mask.

After prefill a row is only its cache and its tokens, whatever its method: a prefix is
keys/values at the front of its cache, a soft prompt entries computed from its virtual
embeddings. Rows of different lengths share one cache by left padding; the mask marks the
entries each row attends (a prefix shorter than its batch-mates' leaves a hole inside the
row, which the mask covers as well), and a row's next position is its count of attended
entries, the positions training gave it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batch:
    def __init__(self, choices: list, cache, mask: torch.Tensor):
        self.choices, self.cache, self.mask = choices, cache, mask  # mask: [rows, entries], long

    def __len__(self) -> int:
        return len(self.choices)

    def positions(self) -> torch.Tensor:
        return self.mask.sum(1, keepdim=True)

    def grow(self) -> torch.Tensor:
        """The mask for a step that appends one entry per row (the fed token)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def join(self, other: "Batch") -> None:
        """Add ``other``'s rows (just prefilled) to these, padding the shorter side on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            a, b = self.mask.shape[1], other.mask.shape[1]
            mine.keys = torch.cat([_pad_left(mine.keys, width - a, 2), _pad_left(theirs.keys, width - b, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width - a, 2), _pad_left(theirs.values, width - b, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width - self.mask.shape[1], 1),
                               _pad_left(other.mask, width - other.mask.shape[1], 1)])
        self.choices += other.choices

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` go on; entries no remaining row attends at the front are dropped."""
        if len(rows) == len(self.choices):  # nobody left: no copy of the cache
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).int().argmax()) if len(rows) else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.choices = [self.choices[i] for i in rows]

    def repeat(self, counts: list[int]) -> None:
        """Row i becomes ``counts[i]`` rows (a request's ``n`` choices share one prefill)."""
        rows = [i for i, k in enumerate(counts) for _ in range(k)]
        if rows != list(range(len(self.mask))):
            index = torch.tensor(rows, device=self.mask.device)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            self.mask = self.mask.index_select(0, index)
