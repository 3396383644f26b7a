"""The dataset format (README "Formats", a contract).

A dataset is a directory or object-store prefix holding

- ``part-NNNNN.parquet``: columns ``image`` (binary, JPEG), ``label`` (int64 in [0, C)),
  ``identity`` (string), ``image_id`` (string, unique);
- ``identities.txt``: line ``i`` is the identity whose label is ``i``;
- optionally ``pairs.parquet``: verification pairs ``image_id_a``, ``image_id_b``,
  ``same`` (bool), ``fold`` (int 0..9);
- ``dataset.json``, written last: ``num_classes``, ``num_images``, ``image_size``, the
  ``label_map_fingerprint`` (sha256 of identities.txt), the shard list and the source.

A dataset without ``dataset.json`` is incomplete and is never opened.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.config import is_single_component

FORMAT_VERSION = 1
META_FILE = "dataset.json"
IDENTITIES_FILE = "identities.txt"
PAIRS_FILE = "pairs.parquet"
NUM_FOLDS = 10

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("identity", pa.string()),
        ("image_id", pa.string()),
    ]
)
PAIRS_SCHEMA = pa.schema(
    [
        ("image_id_a", pa.string()),
        ("image_id_b", pa.string()),
        ("same", pa.bool_()),
        ("fold", pa.int64()),
    ]
)


class DatasetError(ValueError):
    """A dataset that is missing, incomplete or inconsistent; the message names where."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class DatasetMeta:
    num_classes: int
    num_images: int
    image_size: int
    label_map_fingerprint: str
    files: tuple[ShardInfo, ...]
    source: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # inputs left out under on_corrupt=skip, with the reason
    pairs: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["image_size"] = [self.image_size, self.image_size]
        data["channels"] = 3
        data["encoding"] = "jpeg"
        data["identities"] = IDENTITIES_FILE
        data["num_skipped"] = len(self.skipped)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def dataset_fingerprint(uri: str) -> str:
    """The dataset's identity: sha256 of its ``dataset.json`` (shard list, sizes, label map
    fingerprint and source), as the retraining registry and the tracker record it."""
    return "sha256:" + hashlib.sha256(storage.read_bytes(storage.join(uri, META_FILE))).hexdigest()


def label_map_fingerprint(identities: Sequence[str]) -> str:
    """sha256 of the identity-to-label map, i.e. of identities.txt's exact bytes."""
    return "sha256:" + hashlib.sha256(identities_text(identities).encode("utf-8")).hexdigest()


def identities_text(identities: Sequence[str]) -> str:
    for label, name in enumerate(identities):
        if not name or "\n" in name:
            raise DatasetError(
                f"identity name for label {label} is empty or has a newline: {name!r}"
            )
    return "".join(f"{name}\n" for name in identities)


class DatasetWriter:
    """Streams rows into Parquet shards of about ``shard_bytes`` each.

    Call :meth:`add` per image in label order or not, then :meth:`publish` with the
    identities in label order; ``dataset.json`` is written last, so readers never see a
    half-written dataset.
    """

    def __init__(
        self, out: str, image_size: int, *, shard_bytes: int, source: dict[str, Any]
    ) -> None:
        self.out = out
        self.image_size = image_size
        self.shard_bytes = shard_bytes
        self.source = source
        self._rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
        self._pending_bytes = 0
        self._shards: list[ShardInfo] = []
        self._num_images = 0
        self._max_label = -1
        storage.makedirs(out)
        if storage.exists(storage.join(out, META_FILE)):
            raise DatasetError(
                f"{storage.join(out, META_FILE)} already exists: refusing to overwrite a "
                "published dataset; choose a new output or remove it first"
            )

    def add(self, image: bytes, label: int, identity: str, image_id: str) -> None:
        self._rows["image"].append(image)
        self._rows["label"].append(label)
        self._rows["identity"].append(identity)
        self._rows["image_id"].append(image_id)
        self._pending_bytes += len(image)
        self._num_images += 1
        self._max_label = max(self._max_label, label)
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._rows["image"]:
            return
        name = shard_name(len(self._shards))
        self._shards.append(write_shard(self.out, name, self._rows))
        self._rows = {k: [] for k in SCHEMA.names}
        self._pending_bytes = 0

    def publish(
        self,
        identities: Sequence[str],
        skipped: Sequence[str] = (),
        pairs: pa.Table | None = None,
    ) -> DatasetMeta:
        self._flush()
        return publish_dataset(
            self.out,
            DatasetMeta(
                num_classes=len(identities),
                num_images=self._num_images,
                image_size=self.image_size,
                label_map_fingerprint=label_map_fingerprint(identities),
                files=tuple(self._shards),
                source=self.source,
                skipped=tuple(skipped),
            ),
            identities=identities,
            max_label=self._max_label,
            pairs=pairs,
        )


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard(out: str, name: str, rows: dict[str, list[Any]]) -> ShardInfo:
    """One Parquet shard, written atomically (a reader never sees part of it)."""
    table = pa.table(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    # Images are already JPEG: compressing them again only costs time.
    pq.write_table(
        table,
        sink,
        compression={
            "image": "NONE",
            "label": "SNAPPY",
            "identity": "SNAPPY",
            "image_id": "SNAPPY",
        },
    )
    data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(storage.join(out, name), data)
    return ShardInfo(name=name, rows=table.num_rows, bytes=len(data))


def publish_dataset(
    out: str,
    meta: DatasetMeta,
    *,
    identities: Sequence[str],
    max_label: int,
    pairs: pa.Table | None = None,
) -> DatasetMeta:
    """Write identities.txt and pairs.parquet, then ``dataset.json`` last."""
    if meta.num_images == 0:
        raise DatasetError(f"{out}: no images were written; nothing to publish")
    if max_label >= len(identities):
        raise DatasetError(
            f"{out}: label {max_label} written but only {len(identities)} identities given"
        )
    storage.write_text_atomic(storage.join(out, IDENTITIES_FILE), identities_text(identities))
    if pairs is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(pairs.cast(PAIRS_SCHEMA), sink)
        storage.write_bytes_atomic(storage.join(out, PAIRS_FILE), sink.getvalue().to_pybytes())
        meta = replace(meta, pairs=PAIRS_FILE)
    storage.write_text_atomic(storage.join(out, META_FILE), meta.to_json())
    return meta


def read_meta(uri: str) -> DatasetMeta:
    """Open a published dataset's ``dataset.json``, checking that it is complete."""
    meta_uri = storage.join(uri, META_FILE)
    data = storage.read_published_json(uri, META_FILE, what="a dataset", error=DatasetError)
    try:
        meta = DatasetMeta(
            num_classes=int(data["num_classes"]),
            num_images=int(data["num_images"]),
            image_size=int(data["image_size"][0]),
            label_map_fingerprint=str(data["label_map_fingerprint"]),
            files=tuple(
                ShardInfo(name=str(f["name"]), rows=int(f["rows"]), bytes=int(f["bytes"]))
                for f in data["files"]
            ),
            source=dict(data.get("source", {})),
            skipped=tuple(data.get("skipped", ())),
            pairs=data.get("pairs"),
            format_version=int(data["format_version"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(
            f"{meta_uri}: malformed dataset.json ({type(err).__name__}: {err})"
        ) from None
    if meta.format_version != FORMAT_VERSION:
        raise DatasetError(
            f"{meta_uri}: format_version {meta.format_version}, this code reads {FORMAT_VERSION}"
        )
    for name in [*(f.name for f in meta.files), *([meta.pairs] if meta.pairs else [])]:
        if not is_single_component(name):
            raise DatasetError(
                f"{meta_uri}: file name {name!r} is not a plain file name inside the dataset "
                "(no directories, '..', absolute paths or URIs): refusing to open it"
            )
    problem = degenerate_meta_problem(meta)
    if problem is not None:
        raise DatasetError(f"{meta_uri}: {problem}")
    return meta


def degenerate_meta_problem(meta: DatasetMeta) -> str | None:
    """Why a ``dataset.json`` that parsed cannot describe a dataset, or None: no
    identities, no shards, or image counts that do not add up."""
    listed = sum(f.rows for f in meta.files)
    if meta.num_classes < 1:
        return f"num_classes is {meta.num_classes}; expected at least 1 identity"
    if not meta.files or meta.num_images < 1:
        return (
            f"{len(meta.files)} shard file(s) with {meta.num_images} image(s); expected at "
            "least one shard with images"
        )
    if listed != meta.num_images:
        return f"the shards list {listed} rows in all, num_images is {meta.num_images}"
    return None


def read_identities(uri: str, meta: DatasetMeta) -> list[str]:
    """identities.txt, checked against the fingerprint and num_classes in dataset.json."""
    names = storage.read_text(storage.join(uri, IDENTITIES_FILE)).splitlines()
    if len(names) != meta.num_classes or label_map_fingerprint(names) != meta.label_map_fingerprint:
        raise DatasetError(
            f"{storage.join(uri, IDENTITIES_FILE)}: {len(names)} identities with fingerprint "
            f"{label_map_fingerprint(names)}, but dataset.json says {meta.num_classes} with "
            f"{meta.label_map_fingerprint}"
        )
    return names


def iter_shards(
    uri: str, meta: DatasetMeta, columns: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """Each shard as a table, label range checked (an error names shard, row, label and C)."""
    for shard in meta.files:
        shard_uri = storage.join(uri, shard.name)
        fs, path = storage.filesystem(shard_uri)
        try:
            with storage.object_errors(shard_uri, "reading"):
                table = pq.read_table(
                    path, filesystem=fs, columns=list(columns) if columns else None
                )
        except (OSError, pa.ArrowInvalid) as err:
            raise DatasetError(f"{shard_uri}: cannot read Parquet shard: {err}") from None
        if table.num_rows != shard.rows:
            raise DatasetError(
                f"{shard_uri}: {table.num_rows} rows, dataset.json says {shard.rows}"
            )
        if "label" in table.column_names:
            check_label_range(np.asarray(table.column("label")), meta.num_classes, shard_uri)
        yield table


def check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise DatasetError(
            f"{where}: row {row} has label {int(labels[row])}, outside [0, num_classes={num_classes})"
            f" ({bad.size} such rows)"
        )


def read_pairs(uri: str, meta: DatasetMeta) -> pa.Table:
    if meta.pairs is None:
        raise DatasetError(
            f"{storage.join(uri, META_FILE)}: this dataset has no verification pairs"
        )
    pairs_uri = storage.join(uri, meta.pairs)
    fs, path = storage.filesystem(pairs_uri)
    with storage.object_errors(pairs_uri, "reading"):
        table = pq.read_table(path, filesystem=fs)
    folds = np.asarray(table.column("fold"))
    if folds.size and (folds.min() < 0 or folds.max() >= NUM_FOLDS):
        raise DatasetError(
            f"{pairs_uri}: folds must be in 0..{NUM_FOLDS - 1}, found {folds.min()}..{folds.max()}"
        )
    return table
