"""Arrow shards: the writer used by ``tokenize`` and the verifying reader used by
``tune`` and ``evaluate``.

A shard is an Arrow IPC stream file (the format ``datasets`` memory-maps), written to
a temporary name and renamed only when complete. ``manifest.json`` lists every shard
with its rows, tokens and sha256; the reader refuses a missing or altered shard.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from pipelines.common import StageError, read_json, sha256_file

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),  # -100 where no loss is taken (the prompt)
])


def write_shard(path: Path, rows: dict[str, list]) -> dict:
    table = pa.Table.from_pydict(rows, schema=SCHEMA)
    tmp = path.with_name(path.name + ".partial")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return {"file": path.name, "rows": table.num_rows,
            "tokens": sum(len(x) for x in rows["input_ids"]), "sha256": sha256_file(path)}


def read_manifest(shards: Path) -> dict:
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; run the tokenize stage (dvc repro tokenize)")
    return read_json(path)


def load_split(shards: Path, split: str, verify: bool = True):
    """The split as one memory-mapped ``datasets.Dataset``, after checking the manifest."""
    from datasets import Dataset, concatenate_datasets

    shards = Path(shards)
    manifest = read_manifest(shards)
    if split not in manifest["splits"]:
        raise StageError(f"{shards}/manifest.json: no split {split!r} "
                         f"(has {sorted(manifest['splits'])})")
    parts = []
    for entry in manifest["splits"][split]["shards"]:
        path = shards / split / entry["file"]
        if not path.is_file():
            raise StageError(f"{path}: listed in the manifest but missing; re-run tokenize")
        if verify and sha256_file(path) != entry["sha256"]:
            raise StageError(f"{path}: sha256 differs from manifest.json (corrupted or edited); "
                             "re-run tokenize")
        ds = Dataset.from_file(str(path))
        if len(ds) != entry["rows"]:
            raise StageError(f"{path}: {len(ds)} rows, manifest says {entry['rows']}")
        parts.append(ds)
    if not parts:
        return Dataset(SCHEMA.empty_table())
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]
