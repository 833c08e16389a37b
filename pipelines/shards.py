"""Arrow shards: the writer used by ``tokenize``, the verifying reader and the packed-batch
collator used by ``tune``.

A shard is an Arrow IPC stream file (the format ``datasets`` memory-maps) of at most
``tokenize.shard_rows`` rows. It is serialized in memory, hashed, written to
``<name>.partial``, fsynced and only then renamed, so a file with a shard's name is
always complete. ``manifest.json`` is written last and lists every other file of the
directory with its size and sha256 (shards also with rows and tokens), the tokenizer's
fingerprint and the template hash. The reader refuses a missing, altered or unlisted
file, and shards cut by another tokenizer than the base model's.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import base_model
from pipelines.common import StageError, read_json, sha256_file

FORMAT = "ptune-shards/2"  # bumped whenever the layout below changes; the reader refuses others
IGNORE = -100  # the label value torch's cross-entropy skips

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),  # IGNORE on the source, the token id on the target
])
# One row holds several whole examples; attention must stay within each (PackedCollator).
PACKED_SCHEMA = pa.schema([
    ("id", pa.list_(pa.string())),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),  # restart at 0 at each example
    ("seq_lens", pa.list_(pa.int32())),  # the examples' lengths, in order
])
# What readers of a manifest rely on (tokenize writes more).
MANIFEST_KEYS = ("task", "tokenizer", "template_sha256", "packed", "splits", "files")
# The files that make a tokenizer: any change to them changes the token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_fingerprint(base: Path) -> str:
    """sha256 over the tokenizer files of a base-model directory (names and contents)."""
    base_model.require_files(base, base_model.TOKENIZER_FILES)
    h = hashlib.sha256()
    for name in [name for name in TOKENIZER_FILES if (Path(base) / name).is_file()]:
        h.update(f"{name}\0{sha256_file(Path(base) / name)}\0".encode())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes record batches of one split as shards of ``rows`` rows (the last may be shorter)."""

    def __init__(self, directory: Path, schema: pa.Schema, rows: int):
        self.dir, self.schema, self.rows = Path(directory), schema, rows
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.rows:
            table = pa.Table.from_batches(self._pending, self.schema)
            self._write_shard(table.slice(0, self.rows))
            rest = table.slice(self.rows)
            self._pending, self._pending_rows = rest.to_batches(), rest.num_rows

    def close(self) -> list[dict]:
        if self._pending_rows:
            self._write_shard(pa.Table.from_batches(self._pending, self.schema))
        self._pending, self._pending_rows = [], 0
        _fsync_dir(self.dir)  # the renames themselves survive a power cut
        return self.entries

    def _write_shard(self, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue()
        path = self.dir / f"shard-{len(self.entries):05d}.arrow"
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0
        self.entries.append({"file": path.name, "rows": table.num_rows, "tokens": tokens,
                             "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()})


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(shards: Path) -> dict:
    """The manifest of a shards directory; every reader of one comes through here, so a
    missing, truncated or foreign manifest is one message, not a JSON traceback."""
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; run `dvc repro tokenize`")
    try:
        manifest = read_json(path)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise StageError(f"{path}: not valid JSON ({exc}): truncated or edited; rerun `dvc repro tokenize`") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise StageError(f"{path}: format {found!r}, this code reads {FORMAT!r}; rerun `dvc repro tokenize`")
    if missing := [k for k in MANIFEST_KEYS if k not in manifest]:
        raise StageError(f"{path}: no {', '.join(missing)}: edited by hand; rerun `dvc repro tokenize`")
    return manifest


def _listed(manifest: dict) -> dict[str, dict]:
    """relative path -> entry, for every file the manifest vouches for."""
    files = {name: entry for name, entry in manifest.get("files", {}).items()}
    for split, info in manifest["splits"].items():
        files.update({f"{split}/{e['file']}": e for e in info["shards"]})
    return files


def verify(shards: Path, base: Path | None = None, splits: tuple[str, ...] | None = None,
           checksums: bool = True) -> dict:
    """Check the directory against its manifest and return the manifest.

    Every file but manifest.json must be listed (a leftover or foreign file is refused),
    every listed file must exist with its size, and with ``checksums`` its sha256 (for the
    shards of ``splits`` and the audit files; None: all). With ``base``, the tokenizer
    files there must be the ones the shards were cut with.
    """
    shards = Path(shards)
    manifest = read_manifest(shards)
    if base is not None:
        fingerprint = tokenizer_fingerprint(base)
        if fingerprint != manifest["tokenizer"]["sha256"]:
            raise StageError(f"{shards}: tokenized with tokenizer {manifest['tokenizer']['sha256'][:12]} "
                             f"({manifest['tokenizer']['path']}), but {base} has {fingerprint[:12]}; "
                             "re-run tokenize with this base model")
    listed = _listed(manifest)
    present = {p.relative_to(shards).as_posix() for p in shards.rglob("*") if not p.is_dir()}
    extra = sorted(present - set(listed) - {"manifest.json"})
    if extra:
        raise StageError(f"{shards}: {', '.join(extra[:5])}: not listed in manifest.json (a leftover of an "
                         "interrupted run, or a file added by hand); re-run tokenize")
    for rel, entry in listed.items():
        path = shards / rel
        if not path.is_file():
            raise StageError(f"{path}: listed in manifest.json but missing; re-run tokenize")
        if path.stat().st_size != entry["bytes"]:
            raise StageError(f"{path}: {path.stat().st_size} bytes, manifest.json says {entry['bytes']} "
                             "(truncated or edited); re-run tokenize")
        split = rel.split("/")[0] if "/" in rel else None
        if checksums and (splits is None or split is None or split in splits) \
                and sha256_file(path) != entry["sha256"]:
            raise StageError(f"{path}: sha256 differs from manifest.json (corrupted or edited); re-run tokenize")
    return manifest


def load_split(shards: Path, split: str, base: Path | None = None, checksums: bool = True):
    """The split as one memory-mapped ``datasets.Dataset``, after ``verify``."""
    from datasets import Dataset, concatenate_datasets

    shards = Path(shards)
    manifest = read_manifest(shards)
    if split not in manifest["splits"]:
        raise StageError(f"{shards}/manifest.json: no split {split!r} (has {sorted(manifest['splits'])})")
    verify(shards, base=base, splits=(split,), checksums=checksums)
    info = manifest["splits"][split]
    parts = []
    for entry in info["shards"]:
        path = shards / split / entry["file"]
        ds = Dataset.from_file(str(path))  # memory-mapped: pages load as training touches them
        if len(ds) != entry["rows"]:
            raise StageError(f"{path}: {len(ds)} rows, manifest.json says {entry['rows']}")
        parts.append(ds)
    if not parts:
        return Dataset((PACKED_SCHEMA if info["packed"] else SCHEMA).empty_table())
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


class PackedCollator:
    """Right-pads a batch of rows, packed or not, with a 4-D block-diagonal causal mask.

    transformers (5.x) isolates packed examples from ``position_ids`` only when no
    attention mask is given *and* no KV cache is built, and a causal LM builds one in
    training unless ``use_cache=False``; an explicit additive float mask works for eager
    and sdpa attention alike (a boolean one would be added as 0/1 by eager). Padding
    forms its own block, so no row of the mask is all -inf. Unpacked rows are one block.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]):
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(features), n), dtype=torch.long)
        segment = torch.full((len(features), n), -1, dtype=torch.long)  # -1: padding
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            lens = f.get("seq_lens") or [k]
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            positions[i, :k] = torch.cat([torch.arange(m) for m in lens])
            segment[i, :k] = torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens))
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = (segment[:, :, None] == segment[:, None, :]) & causal
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}
