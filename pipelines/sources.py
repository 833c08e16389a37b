"""Readers for every source format ``collect`` understands.

``open_files`` resolves a source's ``uri`` to what it names: one file, the files a glob
matches, a download verified against its sha256, or a Hugging Face dataset. ``read``
yields one ``SourceRow`` per unit of the source (a line, a table row, a Stack Exchange
question), lazily, so memory is bounded by the largest record, never by the source:

- csv/tsv: ``csv.reader`` over lines read in pieces of at most ``max_record_bytes``;
- jsonl/txt: line by line, with the same cap;
- parquet: ``ParquetFile.iter_batches``;
- Posts.xml: ``lxml.etree.iterparse``, each row freed once read; questions and answers
  are joined through a scratch SQLite file, since a dump may list an answer before or
  after its question;
- hf: ``datasets`` (memory-mapped Arrow from a local directory, streaming from the hub).

A row that cannot become a record carries ``problem = (reason, detail)``; ``collect``
quarantines it, never drops it, with the row's raw text where the format has lines.
In csv/tsv an unclosed quote costs its own line only: a quoted field that does not
close into a well-formed row (the file ends inside it, the row has the wrong number of
fields, it outgrows ``max_record_bytes``) means its opening line was malformed, so that
line is quarantined alone and reading resumes at the next line. What makes a whole
source unusable (no such file, a missing column, malformed XML, a failed download, a
wrong checksum) raises ``StageError`` naming the source and the place. What the format
itself says is not a record (blank lines; answers and tag wikis in Posts.xml) is
counted in ``skipped``.
"""
from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import json
import os
import re
import sqlite3
import urllib.error
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipelines.common import StageError, sha256_file
from pipelines.config import SourceConfig

_MAGIC = re.compile(r"[*?\[]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BLOCK = 1 << 20  # read and hash in 1 MiB blocks
_HEAD = 80  # bytes of an over-long line quoted in its quarantine detail: enough to recognise it
# Posts.xml PostTypeIds other than question (1) and answer (2), as counted in `skipped`
_OTHER_POSTS = {None: "post_type_missing", "3": "orphaned_tag_wiki", "4": "tag_wiki_excerpt", "5": "tag_wiki",
                "6": "moderator_nomination", "7": "wiki_placeholder", "8": "privilege_wiki"}


@dataclass(frozen=True)
class SourceFile:
    """One file of a source (for ``hf``: the dataset)."""

    fs: Any  # fsspec filesystem; None for a Hugging Face hub dataset
    path: str  # path within ``fs`` (hf: the dataset name or directory)
    display: str  # how locations name it: project-relative path, URL, or fsspec URL
    key: str | None = None  # for a glob: the file's path below the glob's fixed part, part of each id
    sha256: str | None = None  # known already (a verified download)


@dataclass(frozen=True)
class SourceRow:
    key: str  # what the record id appends to the source name: line, row index or post Id
    location: str  # <file>:<line / row index>
    fields: dict[str, Any] | None  # source column -> value as read; None when unparseable
    problem: tuple[str, str] | None = None  # (reason, detail): quarantine it
    raw: str | None = None  # the row's line(s) as read (csv/tsv, jsonl, txt), undecodable bytes as surrogates


@dataclass
class ReadContext:
    max_record_bytes: int
    scratch: Path  # a private directory for the Stack Exchange join
    skipped: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------- resolving


def open_files(src: SourceConfig, root: Path, download_dir: Path) -> list[SourceFile]:
    """What ``src.uri`` names, relative to ``root``: one file, a glob's files in order, a download."""
    if src.format == "hf":
        return [_hf_target(src, root)]
    if src.uri.startswith(("http://", "https://")):
        path = download(src, download_dir)
        return [SourceFile(LocalFileSystem(), str(path), src.uri, sha256=src.sha256)]
    if "://" in src.uri:
        fs, pattern = fsspec.core.url_to_fs(src.uri)
        shown = fs.unstrip_protocol
    else:
        fs = LocalFileSystem()
        pattern = os.path.abspath(root / src.uri)  # fsspec returns glob matches as absolute paths
        shown = functools.partial(_relative, root=root)
    if not _MAGIC.search(pattern):
        if not fs.exists(pattern):
            raise StageError(f"{src.uri}: no such file (source {src.name!r})")
        if fs.isdir(pattern):
            raise StageError(f"{src.uri}: is a directory (source {src.name!r}); name a file, or a glob "
                             f"such as {src.uri.rstrip('/')}/*.{src.format}")
        return [SourceFile(fs, pattern, src.uri)]
    base = pattern[:_MAGIC.search(pattern).start()].rpartition("/")[0]
    matches = [p for p in sorted(fs.glob(pattern)) if fs.isfile(p)]
    if not matches:
        raise StageError(f"{src.uri}: the glob matches no files (source {src.name!r})")
    # A glob's ids always carry the file, so adding a file later changes no existing id.
    return [SourceFile(fs, p, shown(p), key=p[len(base):].lstrip("/")) for p in matches]


def _relative(path: str, root: Path) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else Path(rel).as_posix()


def file_hashes(file: SourceFile) -> list[dict]:
    """``[{"path", "sha256"}]`` for a file, or for each file of a local HF dataset directory."""
    if file.sha256:
        return [{"path": file.display, "sha256": file.sha256}]
    if file.fs is None:  # a hub dataset: the hub's revision is its identity, not a file hash
        return [{"path": file.display, "sha256": None}]
    if file.fs.isdir(file.path):  # a saved HF dataset: every file in it
        return [{"path": f"{file.display}/{Path(os.path.relpath(p, file.path)).as_posix()}",
                 "sha256": _sha256(file.fs, p)} for p in sorted(file.fs.find(file.path))]
    return [{"path": file.display, "sha256": _sha256(file.fs, file.path)}]


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def download(src: SourceConfig, cache: Path) -> Path:
    """Stream ``src.uri`` into ``cache/<sha256>`` while hashing it; a mismatch is an error.

    The cache is content-addressed: a file already there with the right hash is not
    fetched again, and a changed upstream file can never be read under the old hash.
    """
    target = cache / src.sha256
    if target.is_file() and sha256_file(target) == src.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{src.sha256}.part"
    h = hashlib.sha256()
    request = urllib.request.Request(src.uri, headers={"User-Agent": "ptune-collect"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(partial, "wb") as f:
            while block := response.read(_BLOCK):
                h.update(block)
                f.write(block)
    except urllib.error.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise StageError(f"{src.uri}: HTTP {exc.code} {exc.reason} (source {src.name!r}); "
                         "check the URL in collect.sources") from None
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise StageError(f"{src.uri}: download failed (source {src.name!r}): "
                         f"{getattr(exc, 'reason', None) or exc}") from None
    if h.hexdigest() != src.sha256:
        partial.unlink()
        raise StageError(f"{src.uri}: sha256 mismatch (source {src.name!r}): expected {src.sha256}, "
                         f"got {h.hexdigest()}; the file changed at its origin, or `sha256` in "
                         "collect.sources is wrong")
    os.replace(partial, target)
    return target


# --------------------------------------------------------------------------- reading


def read(src: SourceConfig, file: SourceFile, ctx: ReadContext) -> Iterator[SourceRow]:
    """The rows of one file of ``src``, as read (columns of the source, not yet of the task)."""
    if file.fs is not None and src.format != "hf" and file.fs.size(file.path) == 0:
        raise StageError(f"{file.display}: empty file (source {src.name!r}); it holds no records: fix it "
                         "or remove it from collect.sources")
    reader = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl, "txt": _read_txt,
              "parquet": _read_parquet, "stackexchange": _read_stackexchange, "hf": _read_hf}[src.format]
    return reader(src, file, ctx)


def _needed(src: SourceConfig) -> list[str]:
    return [*src.columns, *([src.id_column] if src.id_column else [])]


def _open_binary(file: SourceFile) -> BinaryIO:
    if isinstance(file.fs, LocalFileSystem):
        return open(file.path, "rb")
    # fsspec's buffered files ignore readline's size limit; a BufferedReader honours it.
    return io.BufferedReader(_RawReader(file.fs.open(file.path, "rb")), buffer_size=_BLOCK)


class _RawReader(io.RawIOBase):
    def __init__(self, f):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class _Lines:
    """The physical lines of a binary file, each read in at most ``limit`` bytes.

    A longer line is consumed without being kept and stands as ``None``; its size and
    first bytes are kept in ``cut``. One runaway line costs no more memory than
    ``limit``, and the lines after it are read as usual.
    """

    def __init__(self, f: BinaryIO, limit: int, file: SourceFile, source: str):
        self.f, self.limit, self.file, self.source = f, limit, file, source
        self.number = 0
        self.cut: dict[int, tuple[int, bytes]] = {}

    def __iter__(self) -> Iterator[bytes | None]:
        while line := self.f.readline(self.limit + 1):
            self.number += 1
            if self.number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            elif self.number == 1 and line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                # Excel's "Unicode text" export: every line would be quarantined as invalid UTF-8
                raise StageError(f"{self.file.display}: UTF-16 text (source {self.source!r}): it opens with a UTF-16 "
                                 "byte-order mark, and sources are read as UTF-8; convert it first (iconv -f UTF-16 "
                                 "-t UTF-8)")
            if len(line) > self.limit and not line.endswith(b"\n"):
                size, head = len(line), line[:_HEAD]
                while more := self.f.readline(_BLOCK):
                    size += len(more)
                    if more.endswith(b"\n"):
                        break
                self.cut[self.number] = (size, head)
                yield None
            else:
                yield line

    def too_large(self, line: int) -> str:
        size, head = self.cut[line]
        return f"line {line} is {size:,} bytes, over collect.max_record_bytes ({self.limit:,}); it starts {head!r}"

    def raw(self, line: int, text: str) -> str:
        """``text`` of ``line`` as read; for an over-long line, its first bytes and its size."""
        if line not in self.cut:
            return text
        size, head = self.cut[line]
        return head.decode("utf-8", "surrogateescape") + f"... [{size - len(head):,} more bytes]"


def undecodable(text: str) -> str | None:
    """Detail for undecodable bytes carried as surrogates (``surrogateescape``), else None."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    code = ord(m.group())
    byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
    return f"{byte} at character {m.start() + 1} is not valid UTF-8 text"


class _Runaway(Exception):
    """A record's lines outgrew ``max_record_bytes`` before the record ended."""


class _Feed:
    """The lines under a ``csv.reader``: it notes the lines each record takes, and can be
    given lines back to read again (after an unclosed quote, the lines it swallowed)."""

    def __init__(self, lines: _Lines):
        self.lines, self.source = lines, iter(lines)
        self.pending: deque[tuple[int, str, int]] = deque()  # (line, text, bytes) to read again
        self.taken: list[tuple[int, str, int]] = []  # the current record's lines
        self.size = 0  # their bytes

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self) -> str:
        if self.pending:
            line = self.pending.popleft()
        else:
            raw, n = next(self.source), self.lines.number  # StopIteration: the end of the file
            # Undecodable bytes become surrogates so that they cost their own row only.
            line = ((n, "\n", self.lines.cut[n][0]) if raw is None
                    else (n, raw.decode("utf-8", "surrogateescape"), len(raw)))
        self.taken.append(line)
        self.size += line[2]
        if len(self.taken) > 1 and self.size > self.lines.limit:
            raise _Runaway
        return line[1]

    def next_record(self) -> None:
        self.taken, self.size = [], 0

    def give_back(self, lines: list[tuple[int, str, int]]) -> None:
        self.pending.extendleft(reversed(lines))

    def raw(self, lines: list[tuple[int, str, int]]) -> str:
        """The text of ``lines`` as read, without the last line break (as jsonl and txt rows)."""
        return "".join(self.lines.raw(n, text) for n, text, _ in lines).rstrip("\r\n")


def _read_delimited(src: SourceConfig, file: SourceFile, ctx: ReadContext) -> Iterator[SourceRow]:
    delimiter = "\t" if src.format == "tsv" else ","
    quoting = csv.QUOTE_NONE if src.quoting == "none" else csv.QUOTE_MINIMAL
    # A quoted field may span lines, up to max_record_bytes (a process-wide setting).
    csv.field_size_limit(max(csv.field_size_limit(), ctx.max_record_bytes))
    with _open_binary(file) as f:
        lines = _Lines(f, ctx.max_record_bytes, file, src.name)
        feed = _Feed(lines)
        reader = csv.reader(feed, delimiter=delimiter, quoting=quoting, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise StageError(f"{file.display}: empty file (source {src.name!r} needs a header row)") from None
        except (csv.Error, _Runaway) as exc:
            raise StageError(f"{file.display}:1: malformed header (source {src.name!r}): "
                             f"{str(exc) or 'a quoted field runs past collect.max_record_bytes'}") from None
        if 1 in lines.cut or (bad := undecodable("".join(header))):
            raise StageError(f"{file.display}:1: unreadable header (source {src.name!r}): "
                             f"{lines.too_large(1) if 1 in lines.cut else bad}")
        if missing := [c for c in _needed(src) if c not in header]:
            raise StageError(f"{file.display}:1: source {src.name!r} lacks column(s) {missing}; "
                             f"header is {header}")
        while True:
            feed.next_record()
            row, problem = None, None
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                problem = str(exc)
            except _Runaway:
                problem = "field larger than field limit"
            taken = feed.taken
            first, last = taken[0][0], taken[-1][0]
            if len(taken) > 1 and (problem or len(row) != len(header)):
                feed.give_back(taken[1:])
                yield SourceRow(str(first), f"{file.display}:{first}", None,
                          _unclosed_quote(first, last, problem, row, len(header), ctx.max_record_bytes),
                          feed.raw(taken[:1]))
                continue
            location, raw = f"{file.display}:{last}", feed.raw(taken)
            if problem:
                reason = ("truncated_row" if "unexpected end of data" in problem
                          else "too_large" if "field larger than field limit" in problem else "malformed_row")
                if reason == "truncated_row":
                    problem = f"the file ends inside a quoted field that starts at line {first}"
                yield SourceRow(str(last), location, None, (reason, problem), raw)
            elif cut := [n for n, *_ in taken if n in lines.cut]:
                yield SourceRow(str(last), location, None, ("too_large", lines.too_large(cut[0])), raw)
            elif not row:
                ctx.skipped["blank_line"] += 1
            elif len(row) != len(header):
                fields = dict(zip(header, row))
                if len(row) > len(header):
                    fields["_extra"] = row[len(header):]
                yield SourceRow(str(last), location, fields,
                          ("field_count", f"expected {len(header)} fields, found {len(row)}"), raw)
            elif bad := next((f"column {c!r}: {d}" for c, v in zip(header, row) if (d := undecodable(v))), None):
                yield SourceRow(str(last), location, dict(zip(header, row)), ("invalid_utf8", bad), raw)
            else:
                yield SourceRow(str(last), location, dict(zip(header, row)), raw=raw)


def _unclosed_quote(first: int, last: int, problem: str | None, row: list[str] | None, width: int,
                    limit: int) -> tuple[str, str]:
    """(reason, detail) for line ``first``, whose quoted field ran to line ``last`` without making a row."""
    alone = f"an unclosed quote? line {first} is quarantined alone and reading resumes at line {first + 1}"
    if problem is None:
        return "field_count", (f"expected {width} fields, found {len(row)} in the row that a quoted field opened "
                               f"on line {first} makes with the lines up to {last}; {alone}")
    if "unexpected end of data" in problem:
        return "truncated_row", f"the file ends inside a quoted field that starts at line {first}; {alone}"
    if "field larger than field limit" in problem:
        return "too_large", (f"a quoted field opened on line {first} runs past collect.max_record_bytes "
                             f"({limit:,}) by line {last}; {alone}")
    return "malformed_row", f"a quoted field opened on line {first} runs to line {last}, where: {problem}; {alone}"


def _text_lines(src: SourceConfig, file: SourceFile, ctx: ReadContext
                ) -> Iterator[tuple[int, str | None, tuple[str, str] | None, str]]:
    """(line, text, problem, raw text) for every non-blank line; blank lines are counted as skipped."""
    with _open_binary(file) as f:
        lines = _Lines(f, ctx.max_record_bytes, file, src.name)
        for raw in lines:
            n = lines.number
            if raw is None:
                yield n, None, ("too_large", lines.too_large(n)), lines.raw(n, "")
                continue
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                ctx.skipped["blank_line"] += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield n, None, ("invalid_utf8", f"byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line "
                                                "is not valid UTF-8"), raw.decode("utf-8", "surrogateescape")
            else:
                yield n, text, None, text


def _read_jsonl(src: SourceConfig, file: SourceFile, ctx: ReadContext) -> Iterator[SourceRow]:
    for n, text, problem, raw in _text_lines(src, file, ctx):
        location = f"{file.display}:{n}"
        if problem:
            yield SourceRow(str(n), location, None, problem, raw)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield SourceRow(str(n), location, None, ("bad_json", f"{exc.msg} (character {exc.pos + 1})"), raw)
            continue
        if not isinstance(obj, dict):
            yield SourceRow(str(n), location, None, ("bad_json", f"a JSON {type(obj).__name__}, not an object"), raw)
        else:
            yield SourceRow(str(n), location, obj, raw=raw)


def _read_txt(src: SourceConfig, file: SourceFile, ctx: ReadContext) -> Iterator[SourceRow]:
    """One record per non-blank line, in the column ``text``."""
    for n, text, problem, raw in _text_lines(src, file, ctx):
        yield SourceRow(str(n), f"{file.display}:{n}", None if problem else {"text": text}, problem, raw)


def _read_parquet(src: SourceConfig, file: SourceFile, ctx: ReadContext) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with file.fs.open(file.path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise StageError(f"{file.display}: not a readable Parquet file (source {src.name!r}): {exc}") from None
        if missing := [c for c in _needed(src) if c not in pf.schema_arrow.names]:
            raise StageError(f"{file.display}: source {src.name!r} lacks column(s) {missing}; "
                             f"columns are {pf.schema_arrow.names}")
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=_needed(src)):
                for values in batch.to_pylist():
                    yield SourceRow(str(index), f"{file.display}:{index}", values)
                    index += 1
        except pa.ArrowException as exc:
            raise StageError(f"{file.display}: unreadable after row {index} (source {src.name!r}): {exc}") from None


def _read_stackexchange(src: SourceConfig, file: SourceFile, ctx: ReadContext) -> Iterator[SourceRow]:
    """One row per question (PostTypeId 1) with its accepted answer (PostTypeId 2).

    Columns: ``title``, ``question`` and ``answer`` (the raw HTML bodies) and ``tags``.
    """
    from lxml import etree

    db_path = ctx.scratch / f"{src.name}.posts.sqlite"
    db = sqlite3.connect(db_path)
    try:
        db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                         "CREATE TABLE question (line INTEGER PRIMARY KEY, id TEXT, title TEXT, body TEXT,"
                         " tags TEXT, accepted TEXT);"
                         "CREATE TABLE answer (id TEXT PRIMARY KEY, body TEXT);")
        with _open_binary(file) as f:
            try:
                for _, post in etree.iterparse(f, events=("end",), tag="row", resolve_entities=False,
                                               no_network=True):
                    a = post.attrib
                    kind = a.get("PostTypeId")
                    if kind == "1":
                        db.execute("INSERT INTO question VALUES (?, ?, ?, ?, ?, ?)",
                                   (post.sourceline, a.get("Id"), a.get("Title"), a.get("Body"), a.get("Tags"),
                                    a.get("AcceptedAnswerId")))
                    elif kind == "2":
                        if db.execute("INSERT OR IGNORE INTO answer VALUES (?, ?)",
                                      (a.get("Id"), a.get("Body"))).rowcount == 0:
                            ctx.skipped["duplicate_answer_id"] += 1
                    else:
                        ctx.skipped[_OTHER_POSTS.get(kind, f"post_type_{kind}")] += 1
                    post.clear()  # and drop the rows already read, or the tree grows with the file
                    while post.getprevious() is not None:
                        del post.getparent()[0]
            except etree.XMLSyntaxError as exc:
                raise StageError(f"{file.display}:{exc.lineno}: malformed XML (source {src.name!r}): "
                                 f"{exc.msg}") from None
        used = db.execute("SELECT COUNT(DISTINCT a.id) FROM question q JOIN answer a ON a.id = q.accepted"
                          ).fetchone()[0]
        ctx.skipped["answer_not_accepted"] += db.execute("SELECT COUNT(*) FROM answer").fetchone()[0] - used
        rows = db.execute("SELECT q.line, q.id, q.title, q.body, q.tags, q.accepted, a.body FROM question q"
                          " LEFT JOIN answer a ON a.id = q.accepted ORDER BY q.line")
        for line, post_id, title, body, tags, accepted, answer in rows:
            # An absent attribute is a missing field (not a null value), as in a CSV without the column.
            fields = {k: v for k, v in {"title": title, "question": body, "answer": answer, "tags": tags}.items()
                      if v is not None}
            problem = (("missing_field", "the question has no Id") if not post_id
                       else ("no_accepted_answer", "the question has no accepted answer") if accepted is None
                       else ("accepted_answer_missing", f"its accepted answer (Id {accepted}) is not in the file")
                       if answer is None else None)
            yield SourceRow(post_id or f"line{line}", f"{file.display}:{line}", fields, problem)
    finally:
        db.close()
        db_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- Hugging Face


def _hf_target(src: SourceConfig, root: Path) -> SourceFile:
    name = src.uri[len("hf:"):]
    local = Path(name) if Path(name).is_absolute() else root / name
    if local.is_dir():
        return SourceFile(LocalFileSystem(), str(local), src.uri)
    return SourceFile(None, name, src.uri)


def _load_hf(src: SourceConfig, file: SourceFile):
    import datasets

    try:
        if file.fs is None:
            return datasets.load_dataset(file.path, src.subset, split=src.split, streaming=True,
                                         revision=src.revision)
        saved = Path(file.path)
        if not any((saved / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            # A directory of data files (csv, json, parquet ...) that datasets can read as it is.
            return datasets.load_dataset(str(saved), src.subset, split=src.split, streaming=True)
        ds = datasets.load_from_disk(str(saved))  # memory-mapped Arrow: nothing is loaded up front
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise StageError(f"{src.uri}: no split {src.split!r} (source {src.name!r}); "
                                 f"it has {sorted(ds)}")
            ds = ds[src.split]
        return ds
    except StageError:
        raise
    except Exception as exc:  # datasets signals a missing, offline or misconfigured dataset in many types
        offline = " (HF_HUB_OFFLINE is set: only local datasets load)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise StageError(f"{src.uri}: cannot load the Hugging Face dataset (source {src.name!r}, split "
                         f"{src.split!r}){offline}: {type(exc).__name__}: {exc}") from None


def _read_hf(src: SourceConfig, file: SourceFile, ctx: ReadContext) -> Iterator[SourceRow]:
    ds = _load_hf(src, file)
    names = ds.column_names  # None for a streamed dataset whose features are not declared
    if names is not None and (missing := [c for c in _needed(src) if c not in names]):
        raise StageError(f"{src.uri}: source {src.name!r} lacks column(s) {missing}; columns are {names}")
    for index, values in enumerate(ds):
        yield SourceRow(str(index), f"{file.display}[{src.split}]:{index}", values)
