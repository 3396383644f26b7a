"""The teacher classifier format (README "Formats", a contract).

A directory or object-store prefix holding row chunks ``rows-NNNNN.bin`` (raw little-endian,
row-major, ``chunk_rows`` rows of ``emb_dim`` values each, the last one shorter) and a
``meta.json`` published last::

    {"format_version": 1, "num_classes": C, "emb_dim": d, "dtype": "float16",
     "normalized": true, "chunk_rows": 65536,
     "chunks": [{"file": "rows-00000.bin", "rows": 65536, "sha256": "..."}, ...],
     "label_map_fingerprint": "sha256:...", "source": {...}}

A rank reads only the chunks overlapping its rows ``[start, start + size)`` and checks their
checksums; nothing here ever materialises the whole of W unless asked to (and then only
below a size limit).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator import storage
from orchestrator.shards import Shard

FORMAT_VERSION = 1
META_FILE = "meta.json"
DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
CHUNK_BYTES = 64 * 2**20
DENSE_LIMIT_BYTES = 2 * 2**30  # load_full refuses W larger than this (use the sharded path)


class ClassifierError(ValueError):
    """A classifier that is missing, incomplete, corrupt, or does not match its dataset."""


@dataclass(frozen=True)
class ChunkInfo:
    file: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class ClassifierMeta:
    num_classes: int
    emb_dim: int
    dtype: str
    normalized: bool
    chunk_rows: int
    chunks: tuple[ChunkInfo, ...]
    label_map_fingerprint: str
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return self.num_classes * self.emb_dim * DTYPES[self.dtype].itemsize


def default_chunk_rows(emb_dim: int, dtype: str) -> int:
    return max(1, CHUNK_BYTES // (emb_dim * DTYPES[dtype].itemsize))


class ClassifierWriter:
    """Streams rows (normalised here, in float64) into chunks; :meth:`publish` writes
    meta.json last.

    Writing over an existing classifier never touches it until the new one is complete:
    the new chunks get names of their own (``rows-<generation>-NNNNN.bin``), the old
    meta.json keeps pointing at the old chunks, and only :meth:`publish` replaces it (one
    atomic write) and then deletes the chunks it no longer names. A rewrite that fails
    leaves the old classifier as it was, loadable."""

    def __init__(
        self,
        out: str,
        emb_dim: int,
        *,
        label_map_fingerprint: str,
        source: dict[str, Any],
        dtype: str = "float16",
        chunk_rows: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, found {dtype!r}")
        self.out, self.emb_dim, self.dtype = out, emb_dim, dtype
        self.fingerprint, self.source = label_map_fingerprint, source
        self.chunk_rows = chunk_rows or default_chunk_rows(emb_dim, dtype)
        self._pending: list[npt.NDArray[Any]] = []
        self._pending_rows = 0
        self._chunks: list[ChunkInfo] = []
        self._rows = 0
        self._created = not storage.exists(out)  # abandon() then removes the directory
        self._prefix, self._previous = new_generation(out)

    def append(self, rows: npt.ArrayLike) -> None:
        block = normalized_rows(rows, emb_dim=self.emb_dim, dtype=self.dtype, first=self._rows)
        self._pending.append(block)
        self._pending_rows += block.shape[0]
        self._rows += block.shape[0]
        while self._pending_rows >= self.chunk_rows:
            self._write_chunk(self.chunk_rows)

    def _write_chunk(self, rows: int) -> None:
        merged = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        chunk, rest = merged[:rows], merged[rows:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]
        self._chunks.append(
            write_chunk(self.out, chunk_name(self._prefix, len(self._chunks)), chunk)
        )

    def abandon(self) -> None:
        """After a failure before :meth:`publish`: delete the chunks written so far (and the
        directory, when this writer created it), leaving ``out`` as it was."""
        if self._created:
            storage.remove_tree(self.out)
            return
        for chunk in self._chunks:
            storage.delete(storage.join(self.out, chunk.file))
        self._chunks = []

    def publish(self) -> ClassifierMeta:
        if self._pending_rows:
            self._write_chunk(self._pending_rows)
        if self._rows == 0:
            raise ClassifierError(f"{self.out}: no rows were written; nothing to publish")
        meta = ClassifierMeta(
            num_classes=self._rows,
            emb_dim=self.emb_dim,
            dtype=self.dtype,
            normalized=True,
            chunk_rows=self.chunk_rows,
            chunks=tuple(self._chunks),
            label_map_fingerprint=self.fingerprint,
            source=self.source,
        )
        publish(self.out, meta, previous=self._previous)
        return meta


def new_generation(out: str) -> tuple[str, set[str]]:
    """(the chunk-name prefix for a new classifier at ``out``, the chunks of the one
    published there now): new chunks never overwrite a published classifier's."""
    storage.makedirs(out)
    previous = previous_chunks(out)
    return (f"rows-{uuid.uuid4().hex[:12]}-" if previous else "rows-"), previous


def chunk_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:05d}.bin"


def normalized_rows(
    rows: npt.ArrayLike, *, emb_dim: int, dtype: str, first: int = 0
) -> npt.NDArray[Any]:
    """Rows scaled to unit length (in float64) and cast to ``dtype``; a zero or non-finite
    row is an error naming its index (``first`` + its position)."""
    block = np.asarray(rows, dtype=np.float64)
    if block.ndim != 2 or block.shape[1] != emb_dim:
        raise ClassifierError(f"rows must be (n, emb_dim={emb_dim}), found {block.shape}")
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    if not np.all(np.isfinite(block)) or np.any(norms == 0):
        bad = int(np.flatnonzero(~np.isfinite(block).all(1) | (norms[:, 0] == 0))[0])
        raise ClassifierError(f"row {first + bad} is zero or not finite: cannot normalise it")
    return (block / norms).astype(DTYPES[dtype])


def write_chunk(out: str, name: str, rows: npt.NDArray[Any]) -> ChunkInfo:
    """One chunk file (rows already normalised and cast, :func:`normalized_rows`)."""
    data = np.ascontiguousarray(rows).tobytes()
    storage.write_bytes_atomic(storage.join(out, name), data)
    return ChunkInfo(name, int(rows.shape[0]), hashlib.sha256(data).hexdigest())


def publish(out: str, meta: ClassifierMeta, *, previous: set[str]) -> None:
    """Write meta.json (one atomic write: the classifier switches over), then delete the
    ``previous`` chunks it no longer names."""
    text = json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n"
    storage.write_text_atomic(storage.join(out, META_FILE), text)
    for name in previous - {c.file for c in meta.chunks}:
        storage.delete(storage.child(out, name, source=storage.join(out, META_FILE)))


def previous_chunks(out: str) -> set[str]:
    """The chunk files of the classifier published at ``out``, if any."""
    if not storage.exists(storage.join(out, META_FILE)):
        return set()
    try:
        return {c.file for c in read_meta(out).chunks}
    except storage.UnsafeNameError:
        raise  # a crafted meta.json: refuse, rather than leave or delete anything
    except ClassifierError:
        return set()  # not a readable classifier: nothing of it to keep or clean up


def write_classifier(
    out: str,
    weight: npt.ArrayLike,
    *,
    label_map_fingerprint: str,
    source: dict[str, Any],
    dtype: str = "float16",
    chunk_rows: int | None = None,
) -> ClassifierMeta:
    """Write a whole (C, d) matrix that is already in memory."""
    w = np.asarray(weight)
    writer = ClassifierWriter(
        out,
        int(w.shape[1]),
        label_map_fingerprint=label_map_fingerprint,
        source=source,
        dtype=dtype,
        chunk_rows=chunk_rows,
    )
    writer.append(w)
    return writer.publish()


def read_meta(uri: str) -> ClassifierMeta:
    meta_uri = storage.join(uri, META_FILE)
    data = storage.read_published_json(
        uri, META_FILE, what="a teacher classifier", error=ClassifierError
    )
    try:
        data["chunks"] = tuple(ChunkInfo(**c) for c in data["chunks"])
        meta = ClassifierMeta(**data)
    except (KeyError, TypeError, ValueError) as err:
        raise ClassifierError(
            f"{meta_uri}: malformed meta.json ({type(err).__name__}: {err})"
        ) from None
    if meta.format_version != FORMAT_VERSION:
        raise ClassifierError(
            f"{meta_uri}: format_version {meta.format_version}, expected {FORMAT_VERSION}"
        )
    if meta.dtype not in DTYPES:
        raise ClassifierError(f"{meta_uri}: dtype {meta.dtype!r}, expected one of {sorted(DTYPES)}")
    for chunk in meta.chunks:  # names every reader joins, and a rebuild deletes
        storage.child(uri, chunk.file, source=meta_uri)
    if sum(c.rows for c in meta.chunks) != meta.num_classes:
        raise ClassifierError(
            f"{meta_uri}: chunks hold {sum(c.rows for c in meta.chunks)} rows, num_classes is {meta.num_classes}"
        )
    return meta


def validate(
    meta: ClassifierMeta,
    where: str,
    *,
    num_classes: int,
    emb_dim: int,
    label_map_fingerprint: str,
    dataset: str = "the dataset",
    model: str = "the student",
) -> None:
    """Fail, naming both values, when the classifier does not fit the dataset or student."""
    if meta.num_classes != num_classes:
        raise ClassifierError(
            f"{where} has num_classes={meta.num_classes} but {dataset} has num_classes={num_classes}"
        )
    if meta.emb_dim != emb_dim:
        raise ClassifierError(
            f"{where} has emb_dim={meta.emb_dim} but {model} has emb_dim={emb_dim}"
        )
    if meta.label_map_fingerprint != label_map_fingerprint:
        raise ClassifierError(
            f"{where} has label_map_fingerprint={meta.label_map_fingerprint} but {dataset} has "
            f"{label_map_fingerprint}: the identity-to-label maps differ"
        )


def read_rows(uri: str, meta: ClassifierMeta, *, start: int, size: int) -> npt.NDArray[np.float32]:
    """Rows [start, start + size) as unit-length float32, reading and verifying only the
    overlapping chunks.

    This is the one place the inherited classifier is normalised on its way into training:
    rows are stored normalised, but float16 storage rounds them off the unit sphere, so
    they are renormalised here after decoding. The losses take them as they come
    (``normalized=True``)."""
    if start < 0 or size < 0 or start + size > meta.num_classes:
        raise ClassifierError(
            f"{uri}: rows [{start}, {start + size}) outside [0, {meta.num_classes})"
        )
    out = np.empty((size, meta.emb_dim), dtype=np.float32)
    chunk_start = 0
    for chunk in meta.chunks:
        chunk_end = chunk_start + chunk.rows
        lo, hi = max(start, chunk_start), min(start + size, chunk_end)
        if lo < hi:
            rows = _read_chunk(uri, meta, chunk)
            out[lo - start : hi - start] = rows[lo - chunk_start : hi - chunk_start]
        chunk_start = chunk_end
    out /= np.linalg.norm(out, axis=1, keepdims=True)  # stored rows are never zero (writer)
    return out


def _read_chunk(uri: str, meta: ClassifierMeta, chunk: ChunkInfo) -> npt.NDArray[Any]:
    chunk_uri = storage.child(uri, chunk.file, source=storage.join(uri, META_FILE))
    data = storage.read_bytes(chunk_uri)
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise ClassifierError(
            f"{chunk_uri}: sha256 does not match meta.json (corrupt or partly rewritten)"
        )
    expected = chunk.rows * meta.emb_dim * DTYPES[meta.dtype].itemsize
    if len(data) != expected:
        raise ClassifierError(f"{chunk_uri}: {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, dtype=DTYPES[meta.dtype]).reshape(chunk.rows, meta.emb_dim)


def read_shard(
    uri: str, meta: ClassifierMeta, *, world_size: int, rank: int
) -> npt.NDArray[np.float32]:
    shard = Shard.for_rank(meta.num_classes, world_size, rank)
    return read_rows(uri, meta, start=shard.class_start, size=shard.local_classes)


def load_full(
    uri: str, meta: ClassifierMeta, limit_bytes: int = DENSE_LIMIT_BYTES
) -> npt.NDArray[np.float32]:
    """All of W, for the dense single-process form; refuses W above ``limit_bytes``."""
    if meta.num_classes * meta.emb_dim * 4 > limit_bytes:
        raise ClassifierError(
            f"{uri}: W is {meta.num_classes} x {meta.emb_dim} ({meta.num_classes * meta.emb_dim * 4 / 2**30:.1f} GiB "
            f"as float32), above the dense limit of {limit_bytes / 2**30:.1f} GiB: use the sharded loss"
        )
    return read_rows(uri, meta, start=0, size=meta.num_classes)


def checksum(meta: ClassifierMeta) -> str:
    """One digest for the whole classifier (what a student checkpoint records)."""
    digest = hashlib.sha256()
    for chunk in meta.chunks:
        digest.update(chunk.sha256.encode())
    digest.update(f"{meta.num_classes}x{meta.emb_dim}:{meta.dtype}".encode())
    return "sha256:" + digest.hexdigest()
