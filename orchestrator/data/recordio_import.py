"""Importing insightface's RecordIO (``train.rec``/``train.idx``) into the dataset format."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.data import recordio
from orchestrator.data.format import DatasetError, DatasetMeta
from orchestrator.data.images import (
    decode_jpeg,
    encode_jpeg,
    fit_square,
)
from orchestrator.data.prepare import (
    ImportOptions,
    ImportPlan,
    Row,
    checked,
    fingerprint_lines,
    plan_shards,
    run_import,
)


@dataclass(frozen=True)
class RecordIOImport(ImportOptions):
    rec: str = ""  # train.rec; train.idx is expected beside it unless idx is given
    idx: str = ""


def write_recordio(options: RecordIOImport) -> DatasetMeta:
    """insightface's ``train.rec``/``train.idx`` -> the dataset format, labels as stored.

    JPEGs already at the target size are kept byte for byte (after a test decode); others
    are decoded, fitted to the square and re-encoded. Identity names are the labels.
    """
    rec = options.rec
    idx = options.idx
    if not idx and rec.endswith(".rec"):
        idx = rec[: -len(".rec")] + ".idx"
    if not idx:
        raise DatasetError(f"{rec}: cannot infer the .idx file; pass it explicitly")
    for uri in (rec, idx):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: no such file (RecordIO import needs .rec and .idx)")
    index = recordio.read_index(idx, storage.size(rec))
    entries = recordio.image_keys(rec, index)
    size = options.image_size

    def make_rows(shard: Sequence[recordio.IndexEntry]) -> Iterator[Row | str]:
        for record in recordio.read_images(rec, shard):

            def make(record: recordio.ImageRecord = record) -> Row:
                where = f"{rec} key {record.key}"
                pixels = decode_jpeg(record.image, where)
                image = record.image
                if pixels.shape != (size, size, 3):
                    image = encode_jpeg(fit_square(pixels, size), options.jpeg_quality)
                return Row(image, record.label, str(record.label), f"rec{record.key}")

            yield checked(make, options.on_corrupt)

    listing = (f"{e.key}\t{e.offset}\t{e.end}" for e in entries)
    plan = ImportPlan(
        source={"kind": "recordio", "rec": rec, "fingerprint": fingerprint_lines(listing)},
        shards=plan_shards(entries, [e.end - e.offset for e in entries], options.shard_bytes),
        make_rows=make_rows,
        identities=lambda max_label: [str(label) for label in range(max_label + 1)],
    )
    return run_import(plan, options, "import recordio")
