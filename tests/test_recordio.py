"""RecordIO import: a small train.rec/train.idx written here, byte by byte, from the format
(insightface / MXNet RecordIO), then read back through jobs.prepare_dataset."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from jobs import prepare_dataset
from orchestrator.config import OnCorrupt
from orchestrator.data import format as fmt
from orchestrator.data.images import CorruptImageError, decode_jpeg, encode_jpeg
from orchestrator.data.recordio_import import RecordIOImport, write_recordio
from orchestrator.data.synthetic import iter_identity_images

MAGIC = 0xCED7230A


def rec_part(payload: bytes, cflag: int) -> bytes:
    head = struct.pack("<II", MAGIC, (cflag << 29) | len(payload))
    return head + payload + b"\0" * (-len(payload) % 4)


def rec_record(payload: bytes) -> bytes:
    """One record as dmlc-core writes it: split wherever the magic sits 4-byte aligned."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == magic]
    if not cuts:
        return rec_part(payload, 0)
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(payload[start:cut])
        start = cut + 4
    pieces.append(payload[start:])
    flags = [1] + [2] * (len(pieces) - 2) + [3]
    return b"".join(rec_part(p, f) for p, f in zip(pieces, flags, strict=True))


def image_payload(labels: list[float], image: bytes) -> bytes:
    """IRHeader (flag, label, id, id2) [+ flag float32 labels] + image bytes."""
    if len(labels) == 1:
        return struct.pack("<IfQQ", 0, labels[0], 0, 0) + image
    extra = struct.pack(f"<{len(labels)}f", *labels)
    return struct.pack("<IfQQ", len(labels), 0.0, 0, 0) + extra + image


def write_rec(path: Path, records: dict[int, bytes]) -> None:
    """records: key -> payload; writes path (.rec) and the .idx beside it."""
    offsets, blob = {}, bytearray()
    for key, payload in records.items():
        offsets[key] = len(blob)
        blob += rec_record(payload)
    path.write_bytes(bytes(blob))
    path.with_suffix(".idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))


# A float32 whose bytes are the record magic: as a second label it forces a split record.
MAGIC_FLOAT = struct.unpack("<f", struct.pack("<I", MAGIC))[0]


def insightface_like(tmp_path: Path, corrupt_key: int | None = None) -> tuple[Path, dict]:
    """3 identities x 4 faces, insightface layout: key 0 header, images, identity records."""
    images: dict[int, tuple[int, bytes]] = {}
    key = 1
    for label in range(3):
        for face in iter_identity_images(1, label, images_per_identity=4, size=112):
            images[key] = (label, encode_jpeg(face, 90))
            key += 1
    small = next(iter(iter_identity_images(1, 9, images_per_identity=1, size=112)))[8:104, 16:96]
    images[key] = (2, encode_jpeg(np.ascontiguousarray(small), 90))  # 96x80: gets fitted
    end = key + 1
    records = {0: image_payload([float(end), float(end + 3)], b"")}
    for k, (label, jpeg) in images.items():
        if k == corrupt_key:
            jpeg = jpeg[:200]
        labels = [float(label), MAGIC_FLOAT] if k == 2 else [float(label)]
        records[k] = image_payload(labels, jpeg)
    for label in range(3):  # identity range records: header only, no image
        records[end + label] = image_payload([float(1 + 4 * label), float(5 + 4 * label)], b"")
    rec = tmp_path / "train.rec"
    write_rec(rec, records)
    return rec, images


def test_split_record_helper_really_splits() -> None:
    payload = image_payload([1.0, MAGIC_FLOAT], b"\xff\xd8 jpeg")
    assert struct.pack("<I", MAGIC) in payload
    written = rec_record(payload)
    assert (struct.unpack_from("<I", written, 4)[0] >> 29) == 1  # first part of a split


def test_recordio_import_keeps_labels_bytes_and_rejoins_split_records(tmp_path: Path) -> None:
    rec, images = insightface_like(tmp_path)
    out = tmp_path / "out"
    code = prepare_dataset.main(["--recordio", str(rec), "--out", str(out), "--shard-mb", "0.005"])
    assert code == 0
    meta = fmt.read_meta(str(out))
    assert (meta.num_classes, meta.num_images) == (3, len(images))
    assert len(meta.files) >= 2 and meta.source["kind"] == "recordio"
    assert fmt.read_identities(str(out), meta) == ["0", "1", "2"]
    rows = {}
    for table in fmt.iter_shards(str(out), meta):
        for row in table.to_pylist():
            rows[row["image_id"]] = row
    assert set(rows) == {f"rec{k}" for k in images}  # header and identity records left out
    for key, (label, jpeg) in images.items():
        row = rows[f"rec{key}"]
        assert row["label"] == label and row["identity"] == str(label)
        if decode_jpeg(jpeg, "test").shape == (112, 112, 3):
            assert row["image"] == jpeg  # kept byte for byte, including the split record
        else:
            assert decode_jpeg(row["image"], "test").shape == (112, 112, 3)


def test_recordio_corrupt_image_is_named_or_skipped(tmp_path: Path) -> None:
    rec, images = insightface_like(tmp_path, corrupt_key=5)
    with pytest.raises(CorruptImageError, match=r"train\.rec key 5: cannot decode JPEG"):
        write_recordio(RecordIOImport(rec=str(rec), out=str(tmp_path / "a")))
    assert not (tmp_path / "a" / "dataset.json").exists()
    meta = write_recordio(
        RecordIOImport(rec=str(rec), out=str(tmp_path / "b"), on_corrupt=OnCorrupt.SKIP)
    )
    assert meta.num_images == len(images) - 1 and len(meta.skipped) == 1
    assert "key 5" in meta.skipped[0]


def test_truncated_rec_is_an_error_naming_the_record(tmp_path: Path) -> None:
    rec, _ = insightface_like(tmp_path)
    data = rec.read_bytes()
    rec.write_bytes(data[: len(data) - 300])
    with pytest.raises(fmt.DatasetError, match=r"train\.(rec|idx)"):
        write_recordio(RecordIOImport(rec=str(rec), out=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "dataset.json").exists()
