"""serving.batch: the preallocated, left-padded cache of one weight group's running rows.

Random joins, steps and departures are checked against a plain model of what each row
holds: its entries right-aligned, holes where a shorter prefix left them, nothing else
attended; the batch as wide as its widest row, as the concatenating cache it replaced was.
"""
from __future__ import annotations

import random

import torch
from transformers import DynamicCache

from serving.batch import Batch

LAYERS, HEADS, DIM = 2, 2, 3
counter = iter(range(1, 10**9))


def entry() -> float:
    return float(next(counter))


def prefilled(rows: list[list[float | None]], max_rows: int = 64) -> tuple[Batch, dict[str, list]]:
    """A batch of rows as a prefill leaves them, each row's entries (None: a hole) right-aligned,
    and what each row holds, by its choice."""
    width = max(map(len, rows))
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    kv = torch.zeros(len(rows), HEADS, width, DIM)
    for i, row in enumerate(rows):
        for j, x in enumerate(row, start=width - len(row)):
            if x is not None:
                mask[i, j], kv[i, :, j] = 1, x
    cache = DynamicCache(ddp_cache_data=[(kv.clone(), -kv.clone()) for _ in range(LAYERS)])
    names = [f"row{next(counter)}" for _ in rows]
    return Batch(list(names), cache, mask, max_rows=max_rows), dict(zip(names, map(list, rows)))


def check(batch: Batch, truth: dict[str, list]) -> None:
    assert sorted(batch.choices) == sorted(truth)
    width = max(len(truth[c]) - next(i for i, x in enumerate(truth[c]) if x is not None) for c in batch.choices)
    assert batch.mask.shape == (len(batch.choices), width)
    assert batch.positions().squeeze(1).tolist() == [sum(x is not None for x in truth[c]) for c in batch.choices]
    for r, c in enumerate(batch.choices):
        row = truth[c][-width:]
        expected = [0] * (width - len(row)) + [int(x is not None) for x in row]
        assert batch.mask[r].tolist() == expected
        attended = batch.mask[r].bool()
        values = [x for x in row if x is not None]
        for layer in batch.cache.layers:
            keys, vals = layer.k[r, :, batch.start:batch.end], layer.v[r, :, batch.start:batch.end]
            assert keys[:, attended].tolist() == [[[v] * DIM for v in values]] * HEADS
            assert vals[:, attended].tolist() == [[[-v] * DIM for v in values]] * HEADS
            assert torch.isfinite(keys).all() and torch.isfinite(vals).all()


def step(batch: Batch, truth: dict[str, list]) -> None:
    """One decode step as the model runs it: grow the mask, every layer appends one entry per row."""
    mask = batch.grow()
    assert mask.shape == (len(batch), batch.end - batch.start + 1)
    new = [entry() for _ in batch.choices]
    for layer in batch.cache.layers:
        k = torch.tensor(new).view(-1, 1, 1, 1).expand(len(new), HEADS, 1, DIM)
        keys, values = layer.update(k, -k)
        assert keys.shape[2] == mask.shape[1]
    for c, x in zip(batch.choices, new):
        truth[c].append(x)


def random_rows(rng: random.Random, count: int) -> list[list]:
    rows = []
    for _ in range(count):
        prefix = [entry() for _ in range(rng.choice([0, 0, 3]))]
        hole = [None] * rng.choice([0, 2, 5]) if prefix else []  # where a longer prefix's entries are
        rows.append(prefix + hole + [entry() for _ in range(rng.randint(1, 40))])
    return rows


def test_random_joins_steps_and_departures_keep_every_row_whole():
    rng = random.Random(7)
    for trial in range(20):
        first = random_rows(rng, rng.randint(1, 4))
        batch, truth = prefilled(first, max_rows=12)
        for _ in range(120):
            op = rng.random()
            if op < 0.1 and len(batch) < 12:
                other, theirs = prefilled(random_rows(rng, rng.randint(1, 12 - len(batch))))
                batch.join(other)
                truth.update(theirs)
            elif op < 0.25 and len(batch) > 1:
                rows = sorted(rng.sample(range(len(batch)), rng.randint(1, len(batch) - 1)))
                gone = [c for i, c in enumerate(batch.choices) if i not in rows]
                batch.keep(rows)
                for c in gone:
                    del truth[c]
            else:
                step(batch, truth)
            check(batch, truth)


def test_a_step_and_a_departure_write_in_place():
    rows = [[entry() for _ in range(n)] for n in (5, 30, 12, 8)]
    batch, truth = prefilled(rows)
    storage = batch.cache.layers[0].k.data_ptr()
    for _ in range(20):
        step(batch, truth)
    gone = batch.choices[1], batch.choices[3]
    batch.keep([0, 2])  # the widest row leaves: the front is dropped without a copy
    del truth[gone[0]], truth[gone[1]]
    check(batch, truth)
    assert batch.cache.layers[0].k.data_ptr() == storage


def steps_until_moved(batch: Batch, truth: dict) -> int:
    """Step until the entries move in storage (a step that starts at the front of it)."""
    for n in range(1, 10_000):
        step(batch, truth)
        if batch.start == 0:
            return n
    raise AssertionError("the entries never moved")


def test_storage_grows_by_half_a_few_times_not_per_step():
    batch, truth = prefilled([[entry() for _ in range(100)], [entry() for _ in range(3)]])
    columns, allocations = batch.cache.layers[0].k.shape[2], 0
    for _ in range(400):
        before = batch.cache.layers[0].k.data_ptr()
        step(batch, truth)
        allocations += batch.cache.layers[0].k.data_ptr() != before
    check(batch, truth)
    assert 1 <= allocations <= 4 and batch.cache.layers[0].k.shape[2] >= 500 > columns


def test_entries_move_back_when_the_front_is_free_and_storage_shrinks_when_far_too_large():
    batch, truth = prefilled([[entry() for _ in range(100)], [entry() for _ in range(3)]])
    storage, columns = batch.cache.layers[0].k.data_ptr(), batch.cache.layers[0].k.shape[2]
    del truth[batch.choices[0]]
    batch.keep([1])  # 3 entries left of 100: the storage is reused, the entries moved to its front
    assert steps_until_moved(batch, truth) == columns - 100 + 1  # the step that found no room
    check(batch, truth)
    assert (batch.cache.layers[0].k.data_ptr(), batch.cache.layers[0].k.shape[2]) == (storage, columns)

    batch, truth = prefilled([[entry() for _ in range(2000)], [entry()]])
    columns = batch.cache.layers[0].k.shape[2]
    for _ in range(columns - 2000 - 10):
        step(batch, truth)
    del truth[batch.choices[1]]
    batch.keep([0])  # a slot for the row that joins
    other, theirs = prefilled([[entry() for _ in range(3)]])
    batch.join(other)
    truth.update(theirs)
    del truth[batch.choices[0]]
    batch.keep([1])  # 3 entries of ~3000, 10 columns from the storage's end: moving them reallocates it small
    steps_until_moved(batch, truth)
    check(batch, truth)
    assert batch.cache.layers[0].k.shape[2] < columns // 8


def test_choices_of_one_prefill_share_its_rows():
    rows = [[entry() for _ in range(4)], [entry() for _ in range(9)]]
    width = 9
    mask = torch.zeros(2, width, dtype=torch.long)
    mask[0, 5:], mask[1] = 1, 1
    kv = torch.zeros(2, HEADS, width, DIM)
    kv[0, :, 5:] = torch.tensor(rows[0]).view(-1, 1)
    kv[1] = torch.tensor(rows[1]).view(-1, 1)
    batch = Batch(["a0", "a1", "a2", "b0"], DynamicCache(ddp_cache_data=[(kv, -kv)] * LAYERS), mask,
                  repeat=[3, 1])
    check(batch, {"a0": list(rows[0]), "a1": list(rows[0]), "a2": list(rows[0]), "b0": list(rows[1])})
