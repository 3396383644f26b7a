"""Reading insightface's ``train.rec`` / ``train.idx`` (MXNet RecordIO) without MXNet.

The format, as MXNet/dmlc-core write it:

- ``train.idx`` is text, one ``key<TAB>byte offset`` line per record.
- ``train.rec`` is a sequence of records. Each starts with the magic ``0xCED7230A``
  (uint32, little endian) and a uint32 whose upper 3 bits are a continuation flag and lower
  29 bits the payload length; the payload follows, padded with zeros to a multiple of 4.
  A payload that contains the magic at a 4-byte-aligned position was split there by the
  writer: the parts carry flags 1 (first), 2 (middle), 3 (last) and the reader puts the
  magic back between them. Flag 0 is a whole record.
- An image record's payload is a 24-byte header ``(flag: uint32, label: float32,
  id: uint64, id2: uint64)``; if ``flag > 0``, ``flag`` float32 labels follow (the identity
  is the first), then the encoded image.
- insightface's datasets put a header-only record at key 0 whose first label is the end of
  the image keys: images are keys ``[1, label[0])``, and the keys after it describe
  identity ranges (no image).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator import storage
from orchestrator.data.format import DatasetError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
IMAGE_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


@dataclass(frozen=True)
class IndexEntry:
    key: int
    offset: int
    end: int  # the next record's offset (or the file size): [offset, end) holds this record


@dataclass(frozen=True)
class ImageRecord:
    key: int
    label: int
    image: bytes


def read_index(idx_uri: str, rec_size: int) -> list[IndexEntry]:
    """``train.idx`` as entries sorted by offset, each knowing where its record ends."""
    pairs: list[tuple[int, int]] = []
    for number, line in enumerate(storage.read_text(idx_uri).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            key, offset = int(fields[0]), int(fields[1])
        except (IndexError, ValueError):
            raise DatasetError(
                f"{idx_uri}: line {number}: expected 'key<TAB>offset', found {line[:80]!r}"
            ) from None
        if not 0 <= offset < rec_size:
            raise DatasetError(
                f"{idx_uri}: line {number}: offset {offset} outside the .rec file ({rec_size} bytes)"
            )
        pairs.append((key, offset))
    if not pairs:
        raise DatasetError(f"{idx_uri}: no records listed")
    pairs.sort(key=lambda kv: kv[1])
    ends = [offset for _, offset in pairs[1:]] + [rec_size]
    return [IndexEntry(k, o, e) for (k, o), e in zip(pairs, ends, strict=True)]


def split_records(buffer: bytes, where: str) -> Iterator[bytes]:
    """The whole payloads in ``buffer`` (which starts at a record boundary), with split
    records joined back together."""
    pos, parts = 0, []
    while pos + 8 <= len(buffer):
        magic, word = struct.unpack_from("<II", buffer, pos)
        if magic != MAGIC:
            raise DatasetError(
                f"{where}: bad record magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x})"
            )
        flag, length = word >> LENGTH_BITS, word & ((1 << LENGTH_BITS) - 1)
        start = pos + 8
        if start + length > len(buffer):
            raise DatasetError(
                f"{where}: record at byte {pos} needs {length} bytes, only "
                f"{len(buffer) - start} remain (truncated file?)"
            )
        parts.append(buffer[start : start + length])
        pos = start + (length + 3) // 4 * 4
        if flag in (0, 3):
            yield MAGIC_BYTES.join(parts)
            parts = []
        elif flag not in (1, 2):
            raise DatasetError(f"{where}: unknown continuation flag {flag} at byte {pos}")
    if parts:
        raise DatasetError(f"{where}: the last record is split and its end is missing")


def unpack_payload(payload: bytes, where: str) -> tuple[np.ndarray, bytes]:
    """(labels, image bytes) of one record's payload."""
    if len(payload) < IMAGE_HEADER.size:
        raise DatasetError(f"{where}: record of {len(payload)} bytes is shorter than its header")
    flag, label, _, _ = IMAGE_HEADER.unpack_from(payload)
    body = payload[IMAGE_HEADER.size :]
    if flag == 0:
        return np.array([label], dtype=np.float32), body
    if len(body) < 4 * flag:
        raise DatasetError(f"{where}: header says {flag} labels, record too short for them")
    return np.frombuffer(body[: 4 * flag], dtype="<f4").copy(), body[4 * flag :]


def image_keys(rec_uri: str, index: Sequence[IndexEntry]) -> list[IndexEntry]:
    """The entries that hold images (insightface's key-0 header record honoured)."""
    by_key = {e.key: e for e in index}
    first = by_key.get(0)
    if first is not None:
        labels, body = unpack_payload(read_payload(rec_uri, first), f"{rec_uri} key 0")
        if not body and labels.size >= 1 and labels[0] >= 1:
            end = int(labels[0])
            return [e for e in index if 1 <= e.key < end]
    return list(index)


def read_payload(rec_uri: str, entry: IndexEntry) -> bytes:
    buffer = storage.read_bytes(rec_uri, entry.offset, entry.end)
    return next(split_records(buffer, f"{rec_uri} key {entry.key}"))


def read_images(rec_uri: str, entries: Sequence[IndexEntry]) -> Iterator[ImageRecord]:
    """The image records of ``entries`` (contiguous in the file, in offset order), read
    with one ranged request."""
    if not entries:
        return
    buffer = storage.read_bytes(rec_uri, entries[0].offset, entries[-1].end)
    for entry in entries:
        where = f"{rec_uri} key {entry.key}"
        chunk = buffer[entry.offset - entries[0].offset : entry.end - entries[0].offset]
        labels, image = unpack_payload(next(split_records(chunk, where)), where)
        label = float(labels[0])
        if not label.is_integer() or label < 0:
            raise DatasetError(f"{where}: label {label} is not a non-negative integer")
        yield ImageRecord(entry.key, int(label), image)
