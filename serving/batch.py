"""The running rows of one weight group: one KV cache, left-padded, and one attention mask.

After prefill a row is only its cache and its tokens, whatever its method: a prefix is
keys/values at the front of its cache, a soft prompt entries computed from its virtual
embeddings. Rows of different lengths share one cache by left padding; the mask marks the
entries each row attends (a prefix shorter than its batch-mates' leaves a hole inside the
row, which the mask covers as well), and a row's next position is its count of attended
entries, the positions training gave it.

The cache is preallocated: each layer's keys and values live in storage of
``[row slots, heads, columns, head dim]``, and the batch is rows ``[0, rows)`` by columns
``[start, end)`` of it. A step writes its new entries in place at ``end``; a row that ends
is overwritten by one from the tail (only that row is copied); entries no row attends any
more are dropped by moving ``start``; the storage is moved or reallocated only when it runs
out, with room to spare, so each of those costs O(1) per step amortized. Written here, not
taken from transformers: its ``DynamicCache`` grows by ``torch.cat`` at every step (a copy
of the whole cache per layer, a fresh allocation each time) and selects rows by copying
it all, and its ``StaticCache`` fixes one length for every row and attends over all of it.
Measured on SmolLM2-135M, 2 CPU cores, 16 rows over ~1,100 entries: a decode step 326 ms
with ``DynamicCache``, 226 ms here (benchmarks/RESULTS.md, "Long prompts").
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

SPARE = 64  # columns a new storage holds beyond what is asked, at least


class _Layer(CacheLayerMixin):
    """One layer's slice of a Batch's storage, as the model's attention sees it."""

    is_sliding = False

    def __init__(self, batch: "Batch", keys: torch.Tensor, values: torch.Tensor, end: int):
        super().__init__()
        self.batch, self.k, self.v, self.end = batch, keys, values, end
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a Batch's layers are initialized when the batch is made")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, q = self.batch.rows, key_states.shape[2]
        if self.end + q > self.k.shape[2]:
            raise RuntimeError(f"the batch has room for {self.k.shape[2] - self.end} entries, not {q}: grow() first")
        self.k[:n, :, self.end:self.end + q] = key_states
        self.v[:n, :, self.end:self.end + q] = value_states
        self.end += q
        start = self.batch.start
        return self.k[:n, :, start:self.end], self.v[:n, :, start:self.end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.end - self.batch.start

    def get_max_length(self) -> int:
        return -1


class Batch:
    def __init__(self, choices: list, cache, mask: torch.Tensor, *, repeat: list[int] | None = None,
                 max_rows: int | None = None):
        """The rows just prefilled: ``cache`` the prefill's (a DynamicCache), ``mask`` its
        ``[rows, entries]`` attention mask; ``repeat``: row i becomes ``repeat[i]`` rows (a
        request's ``n`` choices share one prefill); ``max_rows``: the most rows the batch will
        ever hold (the engine's ``max_batch``), so storage grown for joining rows stops there."""
        index = None
        if repeat is not None and repeat != [1] * len(repeat):
            index = torch.tensor([i for i, k in enumerate(repeat) for _ in range(k)], device=mask.device)
            mask = mask.index_select(0, index)
        self.choices, self.rows, self.max_rows = choices, mask.shape[0], max_rows
        width = mask.shape[1]
        self.start, columns = 0, width + max(SPARE, width // 2)
        self._mask = mask.new_zeros(self.rows, columns)
        self._mask[:, :width] = mask
        layers = []
        for layer in cache.layers:
            kv = []
            for t in (layer.keys, layer.values):
                t = t if index is None else t.index_select(0, index)
                store = t.new_zeros(self.rows, t.shape[1], columns, t.shape[3])
                store[:, :, :width] = t
                kv.append(store)
            layers.append(_Layer(self, kv[0], kv[1], width))
        self.cache = Cache(layers=layers)

    def __len__(self) -> int:
        return len(self.choices)

    @property
    def end(self) -> int:
        return self.cache.layers[0].end

    @property
    def mask(self) -> torch.Tensor:
        """``[rows, entries]``: which of the batch's entries each row attends (a view)."""
        return self._mask[:self.rows, self.start:self.end]

    def positions(self) -> torch.Tensor:
        return self.mask.sum(1, keepdim=True)

    def grow(self) -> torch.Tensor:
        """The mask for a step that appends one entry per row (the fed token)."""
        self._fit(self.rows, self.end - self.start, 1)
        self._mask[:self.rows, self.end] = 1
        return self._mask[:self.rows, self.start:self.end + 1]

    def join(self, other: "Batch") -> None:
        """Add ``other``'s rows (just prefilled) below these, right-aligned: the shorter side
        is padded on the left (masked entries of zeros or of rows that have left, never attended)."""
        n, width, theirs = self.rows, self.end - self.start, other.end - other.start
        self._fit(n + other.rows, max(width, theirs), 0)
        end, start = self.end, min(self.start, self.end - theirs)
        rows = slice(n, n + other.rows)
        self._mask[:n, start:self.start] = 0
        self._mask[rows, start:end] = 0
        self._mask[rows, end - theirs:end] = other.mask
        for mine, their in zip(self.cache.layers, other.cache.layers):
            o = slice(other.start, other.end)
            mine.k[rows, :, end - theirs:end] = their.k[:other.rows, :, o]
            mine.v[rows, :, end - theirs:end] = their.v[:other.rows, :, o]
        self.start, self.rows = start, n + other.rows
        self.choices += other.choices

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` (ascending) go on: each gone row's slot below the new count takes a kept
        row from above it (the only copy), and entries no remaining row attends at the front
        are dropped. The choices are reordered to match their slots."""
        if len(rows) == self.rows:
            return
        count, kept = len(rows), set(rows)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in rows if i >= count]
        choices = [self.choices[i] if i in kept else None for i in range(count)]
        if holes:
            dst = torch.tensor(holes, device=self._mask.device)
            src = torch.tensor(movers, device=self._mask.device)
            live = slice(self.start, self.end)
            self._mask[dst, live] = self._mask[src, live]
            for layer in self.cache.layers:
                layer.k[dst, :, live] = layer.k[src, :, live]
                layer.v[dst, :, live] = layer.v[src, :, live]
            for d, s in zip(holes, movers):
                choices[d] = self.choices[s]
        self.choices, self.rows = choices, count
        if count:
            self.start += int(self.mask.any(0).int().argmax())

    def _fit(self, rows: int, width: int, extra: int) -> None:
        """Make the storage hold ``rows`` row slots and the batch's entries within ``width``
        columns that end at ``end``, with ``extra`` free columns after them. Where the storage
        has the rows and the columns to spare (the need at most 3/4 of it, and not under 1/8 of
        it, which would hold memory the batch no longer needs), the entries move back to its
        first columns; else it is reallocated half as large again as needed. Either way the
        next move is many steps away: O(1) per step, amortized."""
        slots, columns = self._mask.shape
        if rows <= slots and width <= self.end and self.end + extra <= columns:
            return
        live, need = self.end - self.start, width + extra
        if rows <= slots and columns // 8 <= need <= columns * 3 // 4:
            self._move(slots, columns, width - live)
        else:
            grown = max(rows, min(2 * slots, self.max_rows or 2 * slots)) if rows > slots else slots
            self._move(grown, need + max(SPARE, need // 2), width - live)

    def _move(self, slots: int, columns: int, at: int) -> None:
        """Put the entries at columns ``[at, at + live)`` of storage ``slots`` x ``columns``
        (the same storage where it is large enough, else new), zeros around them."""
        n, start, end = self.rows, self.start, self.end
        live = end - start
        same = (slots, columns) == tuple(self._mask.shape)
        mask = self.mask.clone()
        self._mask = self._mask if same else self._mask.new_zeros(slots, columns)
        self._mask[:n].zero_()
        self._mask[:n, at:at + live] = mask
        for layer in self.cache.layers:
            for name in ("k", "v"):
                t = getattr(layer, name)
                part = t[:n, :, start:end].clone()
                if not same:
                    t = t.new_zeros(slots, t.shape[1], columns, t.shape[3])
                t[:n, :, at:at + live] = part
                setattr(layer, name, t)
            layer.end = at + live
        self.start = at
