"""Exact and near-duplicate detection with indexes on disk, so memory stays flat.

Exact: a 128-bit xxh3 hash of the normalized text (case-folded, punctuation dropped,
whitespace collapsed). Near: MinHash over character n-grams of the same normalized
text, LSH banding to find candidates, and the estimated Jaccard of the two signatures
to confirm them (the band match alone lets pairs well under the threshold through).
Keep-first: a record is removed when an earlier kept record matches it, and the
removal names that record. Both indexes are SQLite tables in a scratch directory, so
a corpus ten times larger costs disk, not memory.

MinHash is computed with numpy rather than datasketch: datasketch hashes every shingle
in Python and keeps its LSH index in memory; here the shingles of a text are hashed
in a few vector operations and the index lives on disk.
"""
from __future__ import annotations

import re
import sqlite3
import unicodedata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import xxhash

from pipelines.config import NearDedupConfig

_NOT_WORD = re.compile(r"[\W_]+")


def normalized(text: str) -> str:
    """The text two records must share to count as the same: case, punctuation and
    spacing do not matter ("Great film!" == "great film")."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(norm: str) -> bytes:
    return xxhash.xxh3_128_digest(norm.encode())


class MinHasher:
    """MinHash signatures of character n-gram sets, and their LSH band keys."""

    def __init__(self, cfg: NearDedupConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)  # PCG64: the same permutations on every platform
        n = cfg.bands * cfg.rows
        # Multiply-shift hashing of 64-bit shingle hashes (Dietzfelbinger et al., 1997): one
        # odd multiplier and one offset per permutation, the top 32 bits as the value.
        self._a = rng.integers(1, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=n, dtype=np.uint64)
        self._powers = np.array([pow(1_000_003, cfg.ngram - 1 - j, 2**64) for j in range(cfg.ngram)],
                                dtype=np.uint64)

    def shingles(self, norm: str) -> np.ndarray:
        """64-bit hashes of the distinct character n-grams of ``norm``."""
        codes = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = self.cfg.ngram
        if len(codes) < n:  # a text shorter than one shingle is its own single shingle
            codes = np.concatenate([codes, np.zeros(n - len(codes), dtype=np.uint64)])
        windows = np.lib.stride_tricks.sliding_window_view(codes, n)
        with np.errstate(over="ignore"):  # polynomial hash modulo 2^64, then a splitmix64 finaliser
            h = windows @ self._powers
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        return np.unique(h)

    def signature(self, norm: str) -> np.ndarray:
        h = self.shingles(norm)
        with np.errstate(over="ignore"):
            values = (h[:, None] * self._a[None, :] + self._b[None, :]) >> np.uint64(32)
        return values.min(axis=0).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> list[int]:
        """One signed 64-bit key per band (SQLite integers are signed)."""
        rows = self.cfg.rows
        return [xxhash.xxh3_64_intdigest(sig[i * rows:(i + 1) * rows].tobytes(), seed=i) - 2**63
                for i in range(self.cfg.bands)]


class Match(NamedTuple):
    kept_id: str
    similarity: float  # 1.0 for an exact duplicate; the estimated Jaccard for a near one
    kept_label: str | None  # the kept record's label (classification tasks): a conflict is worth seeing


class DedupIndex:
    """Keep-first duplicate lookups against every record kept so far, on disk."""

    COMMIT_EVERY = 5000  # records per transaction: fast inserts, bounded journal

    def __init__(self, path: Path, near: NearDedupConfig | None):
        self.near = near
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript("""
            PRAGMA journal_mode = OFF;  -- a scratch index: rebuilt from scratch on any failure
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -65536; -- 64 MiB of page cache, whatever the corpus size
            CREATE TABLE exact (key BLOB PRIMARY KEY, id TEXT NOT NULL, label TEXT,
                                removed INTEGER DEFAULT 0) WITHOUT ROWID;
            CREATE TABLE doc (n INTEGER PRIMARY KEY, id TEXT NOT NULL, grp TEXT NOT NULL, label TEXT,
                              sig BLOB NOT NULL, removed INTEGER DEFAULT 0);
            CREATE TABLE band (key INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (key, n)) WITHOUT ROWID;
            BEGIN;
        """)
        self._pending = 0

    def _tick(self) -> None:
        self._pending += 1
        if self._pending >= self.COMMIT_EVERY:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
            self._pending = 0

    def exact_match(self, key: bytes) -> Match | None:
        """The kept record with this key, if any."""
        row = self.db.execute("SELECT id, label FROM exact WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self.db.execute("UPDATE exact SET removed = removed + 1 WHERE key = ?", (key,))
        return Match(row[0], 1.0, row[1])

    def add_exact(self, key: bytes, rec_id: str, label: str | None) -> None:
        """Index a kept record (only once near-dedup has kept it too, so that a removal
        never names a record that was itself removed)."""
        self._tick()
        self.db.execute("INSERT INTO exact (key, id, label) VALUES (?, ?, ?)", (key, rec_id, label))

    def near_match(self, sig: np.ndarray, bands: list[int], rec_id: str, group: str,
                   label: str | None) -> Match | None:
        """The earliest kept record of another group whose signature agrees with ``sig`` on
        at least the threshold share of permutations; None (and this record is indexed) if none.

        Records of one group are never near-duplicates of each other: they share a split,
        so they cannot leak, and a group's several references (E2E's paraphrases of one
        meaning representation) are the data, not redundancy. Exact copies still go.
        """
        self._tick()
        marks = ",".join("?" * len(bands))
        candidates = self.db.execute(
            f"SELECT n, id, label, sig FROM doc WHERE grp != ? AND n IN "
            f"(SELECT n FROM band WHERE key IN ({marks})) ORDER BY n", [group, *bands]).fetchall()
        for n, kept_id, kept_label, blob in candidates:
            similarity = float(np.mean(np.frombuffer(blob, dtype=np.uint32) == sig))
            if similarity >= self.near.threshold:
                self.db.execute("UPDATE doc SET removed = removed + 1 WHERE n = ?", (n,))
                return Match(kept_id, similarity, kept_label)
        n = self.db.execute("INSERT INTO doc (id, grp, label, sig) VALUES (?, ?, ?, ?)",
                            (rec_id, group, label, sig.tobytes())).lastrowid
        self.db.executemany("INSERT OR IGNORE INTO band VALUES (?, ?)", [(k, n) for k in bands])
        return None

    def clusters(self) -> dict[str, int]:
        """Kept records that absorbed at least one exact / near duplicate."""
        return {kind: self.db.execute(f"SELECT COUNT(*) FROM {table} WHERE removed > 0").fetchone()[0]
                for kind, table in (("exact", "exact"), ("near", "doc"))}

    def close(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()
