"""Reading log files: discovery, decompression, bounded line reading and watermarks.

A source file is plain, gzip or zstd (told by its magic bytes), holding either one JSON
record a line (JSONL) or one JSON array of records (such as the ShareGPT dump). Records
are read with bounded memory: a line longer than `max_line_bytes` is skipped through
and reported, never held whole.

Compressed data is bounded too: a file that decompresses past `max_decompressed_bytes`,
or more than `max_compression_ratio` times its compressed size once `RATIO_AFTER` bytes
are out (a decompression bomb), stops there; the rest of it is one bad record
(`decompression_limit`), like the unreadable rest of a damaged file.

A watermark per file remembers how far it was read (decompressed bytes and records) and
the SHA-256 of what was read. On the next run the reader checks that prefix is unchanged
and carries on after it, so only new lines are read; a file whose prefix changed
(rotated, rewritten) is read again from the start.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import xxhash
import zstandard

from drafter.errors import DrafterError


LOG_SUFFIXES = (".jsonl", ".json", ".ndjson", ".log")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
HEAD_BYTES = 4096  # prefix hashed to recognise a file seen before under another name
CHUNK = 1 << 16
RATIO_AFTER = 4 << 20  # decompressed bytes before the ratio is checked (a small file's header skews it)
# Compressed bytes per zstd decompress call: a zstd block of 4 bytes (RLE) can hold 128 KiB,
# so one call yields at most ~8 MiB, whatever the data.
ZSTD_PIECE = 256


@dataclass
class Watermark:
    path: str
    offset: int = 0  # decompressed bytes consumed
    records: int = 0  # lines (or array elements) consumed
    sha256: str = ""  # of the consumed bytes
    head: str = ""  # sha256 of the first HEAD_BYTES consumed bytes
    size: int = 0  # file size on disk when read
    format: str | None = None
    damaged: bool = False  # compressed data cut short: read again only once the file changes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Watermark:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class RawRecord:
    """One line (or array element) of a source, or the reason it cannot be used."""

    source: str
    line: int  # 1-based line number (of the element's start, for arrays)
    data: bytes  # the record's bytes (a bounded prefix when `error` is set)
    size: int  # full size in bytes
    error: str | None = None  # line_too_long | truncated_file | decompression_limit | malformed_json | invalid_utf8
    detail: str = ""
    obj: object = None  # already parsed (JSON array elements)
    offset: int = 0  # of the record's first byte in the decompressed stream
    cut: bool = False  # `data` is a prefix of the record
    sha256: str | None = None  # of the whole record, when `data` is cut


@dataclass(frozen=True)
class LineRange:
    """Whole lines of a plain file, [offset, offset + length), the first numbered `first_line`:
    a shard a worker reads for itself (`range_records`), so that the ingesting process only
    hashes and counts the bytes. `checksum` lets the worker check it reads what was counted
    (XXH3-128: kept nowhere, so a fast hash does; sha256 took 0.9 s a GB in each process)."""

    source: str  # as the file's records name it
    path: str  # absolute, for the worker's open
    offset: int
    length: int
    first_line: int
    lines: int
    checksum: str


# ----- discovery -----------------------------------------------------------------------
def is_log_name(name: str) -> bool:
    base = name
    for suffix in COMPRESSED_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem, _, rotation = base.rpartition(".")
    if rotation.isdigit():  # app.log.1
        base = stem
    return base.endswith(LOG_SUFFIXES)


def discover(inputs: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to read (sorted, each once) and (path, error) for inputs that cannot be read.

    Files named explicitly are always read; folders contribute their log-like files
    (*.jsonl, *.json, *.ndjson, *.log, rotated *.log.1, each optionally .gz/.zst). A symlink
    in a folder is followed only while it stays inside that folder: one that leads out of it
    is refused (an error names it), so a folder cannot make ingest read any file on the host.
    """
    files: dict[str, Path] = {}
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            refused = len(errors)
            found = _walk(path, errors)
            if not found and len(errors) == refused:
                errors.append((str(path), "folder holds no log files (*.jsonl, *.json, *.ndjson, *.log, optionally .gz/.zst)"))
            for p in found:
                files.setdefault(str(p.resolve()), p)
        elif path.is_file():
            files.setdefault(str(path.resolve()), path)
        elif path.exists():
            errors.append((str(path), "not a regular file"))
        else:
            errors.append((str(path), "no such file or folder"))
    return [files[k] for k in sorted(files)], errors


def _walk(root: Path, errors: list[tuple[str, str]]) -> list[Path]:
    """The log files under `root` (hidden names skipped); symlinked folders are not entered
    (those inside `root` are read under their own path), symlinks leading out are refused."""
    real_root = root.resolve()
    found = []

    def unlisted(exc: OSError) -> None:
        errors.append((str(exc.filename), f"cannot list: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            link = Path(dirpath, name)
            if link.is_symlink() and (why := _outside(link, real_root)):
                errors.append((str(link), why + ": not followed"))
        for name in sorted(filenames):
            if name.startswith(".") or not is_log_name(name):
                continue
            p = Path(dirpath, name)
            if p.is_symlink() and (why := _outside(p, real_root)):
                errors.append((str(p), why + ": not read"))
            elif p.is_file():
                found.append(p)
    return found


def _outside(link: Path, real_root: Path) -> str | None:
    """Why a symlink may not be followed (it leads out of the input folder), or None."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError):
        return "symlink loop"
    return None if target.is_relative_to(real_root) else f"symlink leaves the input folder (to {target})"


# ----- decompression ---------------------------------------------------------------------
class DecompressionLimit(Exception):
    """Compressed data expands past the configured bounds (a decompression bomb?)."""


class _ChunkReader(io.RawIOBase):
    """A raw stream over an iterator of byte chunks (so BufferedReader can readline it)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")  # handed out from an offset: the rest is never copied
        self._error: BaseException | None = None  # raised again on every later read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._error is not None:
                raise self._error
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
            except DECOMPRESS_ERRORS as exc:
                self._error = exc
                raise
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _Counted(io.RawIOBase):
    """The compressed file, counting the bytes read from it (for the ratio)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.count += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Limited(io.RawIOBase):
    """Decompressed bytes, refused (DecompressionLimit, on every later read too) once past
    `max_bytes` or `max_ratio` times the compressed bytes read."""

    def __init__(self, inner: BinaryIO, source: _Counted, kind: str, max_bytes: int, max_ratio: float) -> None:
        self.inner, self.source, self.kind = inner, source, kind
        self.max_bytes, self.max_ratio = max_bytes, max_ratio
        self.out = 0
        self._error: DecompressionLimit | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._error is None:
            n = self.inner.readinto(buffer)
            self.out += n
            if self.out > self.max_bytes:
                self._error = DecompressionLimit(
                    f"{self.kind} data decompresses past {self.max_bytes:,} bytes (ingest.max_decompressed_bytes)")
            elif self.out > RATIO_AFTER and self.out > self.max_ratio * self.source.count:
                self._error = DecompressionLimit(
                    f"{self.kind} data expands more than {self.max_ratio:g} times ({self.out:,} bytes from "
                    f"{self.source.count:,}; ingest.max_compression_ratio): a decompression bomb?")
            else:
                return n
        raise self._error

    def close(self) -> None:
        self.inner.close()
        self.source.close()
        super().close()


def _zstd_chunks(raw: BinaryIO) -> Iterator[bytes]:
    """Decompress zstd frames one after another, a small piece of input at a time (so no
    single output is large); a frame cut short raises EOFError (zstandard's stream reader
    would just stop, losing the fact that data is missing)."""
    dctx = zstandard.ZstdDecompressor()
    obj, in_frame = dctx.decompressobj(), False
    while True:
        block = raw.read(CHUNK)
        if not block:
            if in_frame:
                raise EOFError("zstd data ended in the middle of a frame")
            return
        view = memoryview(block)
        for start in range(0, len(view), ZSTD_PIECE):
            data = view[start : start + ZSTD_PIECE]
            while data:
                in_frame = True
                out = obj.decompress(data)
                if out:
                    yield out
                if obj.eof:
                    data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
                else:
                    data = b""


def compression_of(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def open_decompressed(path: Path, max_bytes: int = 8 << 30, max_ratio: float = 1000.0) -> BinaryIO:
    """The file's decompressed bytes, streamed and bounded (see `DecompressionLimit`)."""
    kind = compression_of(path)
    raw = open(path, "rb")
    if kind == "none":
        return raw
    source = _Counted(raw)
    if kind == "gzip":
        inner = gzip.GzipFile(fileobj=source, mode="rb")
    else:
        inner = _ChunkReader(_zstd_chunks(source))
    return io.BufferedReader(_Limited(inner, source, kind, max_bytes, max_ratio), CHUNK)  # type: ignore[arg-type]


# The errors a damaged (or over-expanding) compressed stream raises while being read.
DECOMPRESS_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError, DecompressionLimit)


# ----- reading -----------------------------------------------------------------------------
@dataclass
class SourceReader:
    """Iterate the new records of one file; afterwards `watermark` says how far it got."""

    path: Path
    previous: Watermark | None = None
    max_line_bytes: int = 8_000_000
    keep_bytes: int = 65_536  # bytes of a bad record kept for the quarantine
    max_decompressed_bytes: int = 8 << 30
    max_compression_ratio: float = 1000.0
    watermark: Watermark = field(init=False)
    restarted: bool = field(init=False, default=False)  # prefix changed: read from the start
    pending_partial: bool = field(init=False, default=False)  # unterminated last line left for later
    compression: str = field(init=False, default="none")

    def __post_init__(self) -> None:
        self.watermark = Watermark(path=str(self.path))

    def records(self, ranges: tuple[int, int] | None = None) -> Iterator[RawRecord | LineRange]:
        """The new records, in order. With `ranges` = (lines, bytes), the lines of a plain (not
        compressed, not JSON array) file come as `LineRange`s of about that many lines or bytes
        instead, hashed and counted here; the watermark is the same either way."""
        self.compression = compression_of(self.path)
        prev = self.previous
        if prev is not None and prev.damaged and prev.size == os.path.getsize(self.path):
            self.watermark = prev  # the damaged tail was quarantined already
            return
        stream = self._open()
        try:
            hasher, offset, count, head = hashlib.sha256(), 0, 0, b""
            if self.previous is not None and self.previous.offset > 0:
                ok, hasher, head = self._verify_prefix(stream, self.previous)
                if ok:
                    offset, count = self.previous.offset, self.previous.records
                else:
                    self.restarted = True
                    stream.close()
                    stream = self._open()
                    hasher, head = hashlib.sha256(), b""
            state = {"hasher": hasher, "offset": offset, "count": count, "head": head, "damaged": False}
            if offset == 0 and self._is_array():
                yield from self._array_records(stream, state)
            elif ranges is not None and self.compression == "none":
                yield from self._line_ranges(stream, state, *ranges)
            else:
                yield from self._line_records(stream, state)
            self.watermark = Watermark(
                path=str(self.path),
                offset=state["offset"],
                records=state["count"],
                sha256=state["hasher"].hexdigest(),
                head=hashlib.sha256(state["head"]).hexdigest(),
                size=os.path.getsize(self.path),
                damaged=state["damaged"],
            )
        finally:
            stream.close()

    # -- helpers
    def _open(self) -> BinaryIO:
        return open_decompressed(self.path, self.max_decompressed_bytes, self.max_compression_ratio)

    @staticmethod
    def _verify_prefix(stream: BinaryIO, wm: Watermark) -> tuple[bool, "hashlib._Hash", bytes]:
        hasher, left, head = hashlib.sha256(), wm.offset, b""
        try:
            while left > 0:
                block = stream.read(min(CHUNK, left))
                if not block:
                    return False, hasher, head
                if len(head) < HEAD_BYTES:
                    head += block[: HEAD_BYTES - len(head)]
                hasher.update(block)
                left -= len(block)
        except DECOMPRESS_ERRORS:
            return False, hasher, head
        return hasher.hexdigest() == wm.sha256, hasher, head

    def _is_array(self) -> bool:
        """Does the file hold one JSON array (first non-blank byte '[')? Checked on a separate
        stream, so that damaged data is reported by the main read, not here."""
        try:
            with self._open() as probe:
                head = probe.read(CHUNK)
        except DECOMPRESS_ERRORS:
            return False
        return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"["

    def _consume(self, state: dict, data: bytes, records: int = 1) -> None:
        state["hasher"].update(data)
        state["offset"] += len(data)
        state["count"] += records
        if len(state["head"]) < HEAD_BYTES:
            state["head"] += data[: HEAD_BYTES - len(state["head"])]

    def _line_records(self, stream: BinaryIO, state: dict) -> Iterator[RawRecord]:
        source, limit = str(self.path), self.max_line_bytes
        while True:
            line_no, offset = state["count"] + 1, state["offset"]
            try:
                chunk = stream.readline(limit + 1)
            except DECOMPRESS_ERRORS as exc:
                yield self._unreadable(line_no, offset, exc)
                self._note_truncation(state)
                return
            if not chunk:
                return
            if len(chunk) > limit and not chunk.endswith(b"\n"):
                # Too long to hold: skip through to the end of the line, keep a prefix.
                size, kept, truncated = len(chunk), chunk[: self.keep_bytes], None
                digest = hashlib.sha256(chunk)
                self._consume(state, chunk, records=0)
                while not chunk.endswith(b"\n"):
                    try:
                        chunk = stream.readline(CHUNK)
                    except DECOMPRESS_ERRORS as exc:
                        truncated = exc
                        break
                    if not chunk:
                        break
                    size += len(chunk)
                    digest.update(chunk.rstrip(b"\r\n"))
                    self._consume(state, chunk, records=0)
                state["count"] += 1
                yield RawRecord(source, line_no, kept, size, "line_too_long",
                                f"line of {size:,} bytes is over the {limit:,}-byte limit (ingest.max_line_bytes)",
                                offset=offset, cut=True, sha256=digest.hexdigest())
                if truncated is not None:
                    yield self._unreadable(line_no + 1, state["offset"], truncated)
                    self._note_truncation(state)
                    return
                continue
            if not chunk.endswith(b"\n") and self.compression == "none" and not _is_json(chunk):
                # An unterminated last line of a plain file is probably still being
                # written: leave it (unread, uncounted) for the next run.
                self.pending_partial = True
                return
            self._consume(state, chunk)
            data = chunk.rstrip(b"\r\n")
            yield RawRecord(source, line_no, data, len(chunk), offset=offset)

    def _line_ranges(self, stream: BinaryIO, state: dict, max_lines: int, max_bytes: int) -> Iterator[LineRange]:
        """`_line_records`' reading of a plain file as ranges of whole lines: the same lines
        consumed (a line over the limit included, an unterminated last line only when it is
        JSON or over the limit), hashed and counted here in blocks, not one by one."""
        source, path, limit = str(self.path), str(self.path.resolve()), self.max_line_bytes
        start, first, lines, digest = state["offset"], state["count"] + 1, 0, xxhash.xxh3_128()
        tail: list[bytes] = []  # bytes after the last line end, not consumed yet
        tail_len = 0  # bytes after the last line end; past the limit they are consumed as they come

        def consume(data: bytes, records: int) -> None:
            self._consume(state, data, records)
            digest.update(data)

        def cut() -> LineRange:
            nonlocal start, first, lines, digest
            rng = LineRange(source, path, start, state["offset"] - start, first, lines, digest.hexdigest())
            start, first, lines, digest = state["offset"], state["count"] + 1, 0, xxhash.xxh3_128()
            return rng

        while block := stream.read(CHUNK):
            if block.find(b"\n") < 0:  # still inside one line
                tail.append(block)
                tail_len += len(block)
                if tail_len > limit:  # a line over the limit is consumed whatever follows: never held
                    for piece in tail:
                        consume(piece, 0)
                    tail = []
                continue
            for piece in tail:  # the line this block ends began before it
                consume(piece, 0)
            pos = done = 0  # block[done:pos]: whole lines not consumed yet
            while (nl := block.find(b"\n", pos)) >= 0:
                pos, lines = nl + 1, lines + 1
                if lines >= max_lines or state["offset"] + pos - done - start >= max_bytes:
                    consume(block[done:pos], block.count(b"\n", done, pos))
                    done = pos
                    yield cut()
            if done < pos:
                consume(block[done:pos], block.count(b"\n", done, pos))
            tail, tail_len = [block[pos:]], len(block) - pos
        rest = b"".join(tail)
        if tail_len > limit or (rest and _is_json(rest)):  # a last record without its line end
            consume(rest, 1)
            lines += 1
        elif rest:
            self.pending_partial = True  # probably still being written: left for the next run
        if lines:
            yield cut()

    def _unreadable(self, line_no: int, offset: int, exc: BaseException) -> RawRecord:
        """The rest of a file that cannot be read: damaged, or expanding past the limits."""
        if isinstance(exc, DecompressionLimit):
            return RawRecord(str(self.path), line_no, b"", 0, "decompression_limit", str(exc), offset=offset)
        return RawRecord(str(self.path), line_no, b"", 0, "truncated_file",
                         f"{self.compression} data is damaged or cut short: {exc}", offset=offset)

    def _note_truncation(self, state: dict) -> None:
        state["count"] += 1  # the unreadable rest counts as one record (quarantined)
        state["damaged"] = True

    def _array_records(self, stream: BinaryIO, state: dict) -> Iterator[RawRecord]:
        """Stream the elements of one top-level JSON array (bounded by max_line_bytes)."""
        source, decoder = str(self.path), json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        buf, pos, line, eof, want = "", 0, 1, False, CHUNK
        started = False
        mark = [0, 0]  # a position in buf and its byte offset in the stream (advanced, never recounted)

        def byte_at(p: int) -> int:
            mark[1] += len(buf[mark[0] : p].encode())
            mark[0] = p
            return mark[1]

        def fail(reason: str, detail: str) -> RawRecord:
            # The rest of an array cannot be resynchronised: it is one quarantined record.
            state["count"] += 1
            rest = buf[pos:]
            return RawRecord(source, line, rest[: self.keep_bytes].encode(), len(rest), reason, detail,
                             offset=byte_at(pos), cut=len(rest) > self.keep_bytes,
                             sha256=hashlib.sha256(rest.encode()).hexdigest())

        while True:
            # Make sure a whole element is in the buffer (or the input is exhausted); the
            # blocks are joined once, not appended one by one to a growing buffer.
            if not eof and len(buf) - pos < want:
                mark[1], mark[0] = byte_at(pos), 0
                parts, have, error = [buf[pos:]], len(buf) - pos, None
                while not eof and have < want:
                    try:
                        block = stream.read(CHUNK)
                    except DECOMPRESS_ERRORS as exc:
                        error = exc
                        break
                    eof = not block
                    try:
                        text = utf8.decode(block, final=eof)
                    except UnicodeDecodeError as exc:
                        error = exc
                        break
                    self._consume(state, block, records=0)
                    parts.append(text)
                    have += len(text)
                buf, pos = "".join(parts), 0
                if isinstance(error, UnicodeDecodeError):
                    yield fail("invalid_utf8", f"invalid UTF-8 in a JSON array: {error}")
                    return
                if error is not None:
                    record = self._unreadable(line, 0, error)
                    yield fail(record.error, record.detail)
                    state["damaged"] = True
                    return
            # Skip whitespace, the opening bracket and separators.
            while pos < len(buf) and buf[pos] in " \t\r\n,\ufeff[":
                if buf[pos] == "\n":
                    line += 1
                if buf[pos] == "[":
                    if started:
                        break
                    started = True
                pos += 1
            if pos >= len(buf):
                if eof:
                    yield fail("malformed_json", "JSON array is not closed")
                    return
                want = CHUNK
                continue
            if buf[pos] == "]":
                rest = buf[pos + 1 :].strip()
                if rest or not eof:
                    # Drain what is left to be sure nothing follows the array.
                    if not eof:
                        want = len(buf) - pos + CHUNK
                        continue
                    yield fail("malformed_json", "data after the end of the JSON array")
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if not eof and len(buf) - pos <= self.max_line_bytes:
                    want = (len(buf) - pos) * 2 + CHUNK
                    continue
                if len(buf) - pos > self.max_line_bytes:
                    yield fail("line_too_long", f"JSON array element over {self.max_line_bytes:,} bytes")
                else:
                    yield fail("malformed_json", f"malformed JSON in array: {exc.msg} (line {line + buf.count(chr(10), pos, exc.pos)})")
                return
            text = buf[pos:end]
            state["count"] += 1
            yield RawRecord(source, line, text.encode(), len(text), obj=obj, offset=byte_at(pos))
            line += buf.count("\n", pos, end)
            pos, want = end, CHUNK


class SourceChanged(DrafterError, RuntimeError):
    """A range's bytes are not the ones the ingesting process hashed (the file was rewritten):
    the run stops, nothing is published, and the next run reads the file again."""


class _Window(io.RawIOBase):
    """`length` bytes of a file from its current position, then end of stream."""

    def __init__(self, raw: BinaryIO, length: int) -> None:
        self.raw, self.left = raw, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self.left]
        n = self.raw.readinto(view) if len(view) else 0
        self.left -= n
        return n


def range_records(rng: LineRange, max_line_bytes: int, keep_bytes: int) -> list[RawRecord]:
    """The records of a `LineRange`, exactly as `SourceReader.records()` yields them: read
    where the range is prepared (a Dask worker), checked against the ingesting process's hash."""
    reader = SourceReader(Path(rng.source), max_line_bytes=max_line_bytes, keep_bytes=keep_bytes)
    with open(rng.path, "rb") as f:
        f.seek(rng.offset)
        stream = io.BufferedReader(_Window(f, rng.length), CHUNK)
        state = {"hasher": xxhash.xxh3_128(), "offset": rng.offset, "count": rng.first_line - 1, "head": b"",
                 "damaged": False}
        records = list(reader._line_records(stream, state))  # a range ends at a line end: no partial line
    if state["hasher"].hexdigest() != rng.checksum or len(records) != rng.lines:
        raise SourceChanged(f"{rng.source} changed while it was ingested (bytes {rng.offset:,}-"
                            f"{rng.offset + rng.length:,} differ): ingest again")
    return records


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def head_hash(path: Path, n: int = HEAD_BYTES) -> str | None:
    """sha256 of the first n decompressed bytes (None if unreadable)."""
    try:
        with open_decompressed(path) as stream:
            return hashlib.sha256(stream.read(n)).hexdigest()
    except (OSError, *DECOMPRESS_ERRORS):
        return None
