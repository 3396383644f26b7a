"""Writers that turn a source of faces into the dataset format of :mod:`.format`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from orchestrator import storage
from orchestrator.config import MAX_SEED, OnCorrupt, SyntheticConfig
from orchestrator.data import format as fmt
from orchestrator.data import pairs as pair_draw
from orchestrator.data.format import DatasetError, DatasetMeta, DatasetWriter, ShardInfo
from orchestrator.data.images import (
    CorruptImageError,
    encode_jpeg,
    load_image_file,
)
from orchestrator.data.pairs import make_pairs
from orchestrator.data.synthetic import iter_identity_images
from orchestrator.progress import Progress

T = TypeVar("T")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class SyntheticDatasets:
    train: DatasetMeta
    eval: DatasetMeta
    train_uri: str
    eval_uri: str


def write_synthetic(config: SyntheticConfig) -> SyntheticDatasets:
    """``train/``: identities [0, N); ``eval/``: the next ``eval_identities``, with pairs.

    Both come from the same generator with disjoint identity indices, so evaluation is on
    people never seen in training. Identical config, identical bytes.
    """
    train_uri, eval_uri = storage.join(config.out, "train"), storage.join(config.out, "eval")
    source = {"kind": "synthetic", "seed": config.seed, "generator_version": 1}
    train = _write_synthetic_split(
        config, train_uri, range(config.num_identities), source, pairs=False
    )
    first_eval = config.num_identities
    eval_ids = range(first_eval, first_eval + config.eval_identities)
    held_out = _write_synthetic_split(config, eval_uri, eval_ids, source, pairs=True)
    return SyntheticDatasets(train=train, eval=held_out, train_uri=train_uri, eval_uri=eval_uri)


def _write_synthetic_split(
    config: SyntheticConfig, out: str, identities: range, source: dict[str, object], pairs: bool
) -> DatasetMeta:
    writer = DatasetWriter(out, config.image_size, shard_bytes=config.shard_bytes, source=source)
    names, image_ids, labels = [], [], []
    progress = Progress(
        f"synthesize {os.path.basename(out.rstrip('/'))}",
        len(identities) * config.images_per_identity,
    )
    for label, identity in enumerate(identities):
        name = f"synth{identity:07d}"
        names.append(name)
        images = iter_identity_images(
            config.seed,
            identity,
            images_per_identity=config.images_per_identity,
            size=config.image_size,
        )
        for index, image in enumerate(images):
            image_id = f"{name}/{index:03d}"
            writer.add(encode_jpeg(image, config.jpeg_quality), label, name, image_id)
            if pairs:
                image_ids.append(image_id)
                labels.append(label)
            progress.update()
    progress.close()
    table = (
        make_pairs(image_ids, labels, pairs_per_fold=config.pairs_per_fold, seed=config.seed)
        if pairs
        else None
    )
    return writer.publish(names, pairs=table)


@dataclass(frozen=True)
class ImportOptions:
    """Options of ``python -m jobs.prepare_dataset`` (both input kinds)."""

    out: str
    image_size: int = 112
    on_corrupt: OnCorrupt = OnCorrupt.ERROR
    pairs_per_fold: int = 0  # 0: no verification pairs
    seed: int = 0
    jpeg_quality: int = 95
    shard_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        problem = import_option_problem(self)
        if problem is not None:
            raise DatasetError(problem)


MIN_IMAGE_SIZE = 16


def import_option_problem(options: ImportOptions) -> str | None:
    """Why ``options`` cannot make a dataset (named by the command-line flag), or None."""
    checks = (
        (MIN_IMAGE_SIZE <= options.image_size <= 4096, "--image-size", "in [16, 4096]",
         options.image_size),
        (1 <= options.jpeg_quality <= 100, "--jpeg-quality", "in [1, 100]", options.jpeg_quality),
        (options.pairs_per_fold >= 0, "--pairs-per-fold", ">= 0", options.pairs_per_fold),
        (0 <= options.seed <= MAX_SEED, "--seed", "in [0, 2**63 - 1]", options.seed),
        (options.shard_bytes >= 1, "--shard-mb", "> 0", options.shard_bytes / 2**20),
    )  # fmt: skip
    for ok, flag, expected, found in checks:
        if not ok:
            return f"{flag}: expected {expected}, found {found}"
    return None


@dataclass(frozen=True)
class FolderImport(ImportOptions):
    input: str = ""
    # "START:STOP": only these identities of the sorted sub-folders (Python slice bounds,
    # either may be empty), e.g. "0:30" for training and "30:" for held-out evaluation.
    identities: str = ""


def identity_slice(text: str) -> slice:
    """``"30:"`` -> slice(30, None); an error names the expected form."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise DatasetError(
            f"--identities {text!r}: expected START:STOP (indices into the identity folders "
            "sorted by name, either may be empty), e.g. 0:30 or 30:"
        ) from None


@dataclass(frozen=True)
class Row:
    image: bytes
    label: int
    identity: str
    image_id: str


@dataclass(frozen=True)
class ImportPlan(Generic[T]):
    """What an import writes: shard ``i`` holds the rows made from ``shards[i]``.

    The plan depends only on the input listing and the options, so a rerun makes the same
    plan and can skip the shards that are already written.
    """

    source: dict[str, Any]  # goes into dataset.json; "fingerprint" identifies the input
    shards: list[list[T]]
    make_rows: Callable[[Sequence[T]], Iterator[Row | str]]  # str: a skipped input, why
    identities: Callable[[int], list[str]]  # max label seen -> identity names by label


PROGRESS_DIR = "_import"  # per-shard completion records of an import in progress


def plan_shards(items: Sequence[T], sizes: Sequence[int], shard_bytes: int) -> list[list[T]]:
    """Consecutive runs of ``items`` whose source sizes add up to about ``shard_bytes``."""
    shards: list[list[T]] = [[]]
    pending = 0
    for item, size in zip(items, sizes, strict=True):
        if pending >= shard_bytes:
            shards.append([])
            pending = 0
        shards[-1].append(item)
        pending += size
    return shards


def fingerprint_lines(lines: Iterator[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8") + b"\n")
    return "sha256:" + digest.hexdigest()


def run_import(plan: ImportPlan[T], options: ImportOptions, label: str) -> DatasetMeta:
    """Write the shards of ``plan`` that are not written yet, then publish.

    Each shard's completion record (rows, bytes, largest label, skipped inputs) is written
    right after the shard, so a rerun after a crash resumes at the first unfinished shard.
    ``dataset.json`` comes last: until then the output is not a readable dataset.
    """
    out = options.out
    settings = {
        "source": plan.source,
        "image_size": options.image_size,
        "jpeg_quality": options.jpeg_quality,
        "shard_bytes": options.shard_bytes,
        "on_corrupt": options.on_corrupt.value,
        "num_shards": len(plan.shards),
    }
    storage.makedirs(out)
    finished = finished_import(out, settings)
    if finished is not None:
        return finished
    progress_uri = storage.join(out, PROGRESS_DIR)
    claim_output(out, progress_uri, settings)
    total = sum(len(items) for items in plan.shards)
    progress = Progress(label, total)
    done: list[dict[str, Any]] = []
    for index, items in enumerate(plan.shards):
        record_uri = storage.join(progress_uri, f"{fmt.shard_name(index)}.json")
        if storage.exists(record_uri):
            done.append(json.loads(storage.read_text(record_uri)))
            progress.update(len(items), "resumed")
            continue
        record = write_import_shard(out, index, rows=plan.make_rows(items), progress=progress)
        storage.write_text_atomic(record_uri, json.dumps(record))
        done.append(record)
    skipped = [reason for record in done for reason in record["skipped"]]
    progress.close(f"{len(skipped)} skipped" if skipped else "")
    max_label = max(record["max_label"] for record in done)
    identities = plan.identities(max_label)
    meta = DatasetMeta(
        num_classes=len(identities),
        num_images=sum(record["shard"]["rows"] for record in done),
        image_size=options.image_size,
        label_map_fingerprint=fmt.label_map_fingerprint(identities),
        files=tuple(ShardInfo(**record["shard"]) for record in done if record["shard"]["rows"]),
        source={**plan.source, "import_settings_sha256": settings_digest(settings)},
        skipped=tuple(skipped),
    )
    pairs = import_pairs(out, meta, options) if options.pairs_per_fold else None
    return fmt.publish_dataset(out, meta, identities=identities, max_label=max_label, pairs=pairs)


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def finished_import(out: str, settings: dict[str, Any]) -> DatasetMeta | None:
    """The published dataset at ``out`` if it came from this very input and these options;
    an error if something else is published there; None if nothing is."""
    if not storage.exists(storage.join(out, fmt.META_FILE)):
        return None
    meta = fmt.read_meta(out)
    if meta.source.get("import_settings_sha256") == settings_digest(settings):
        print(f"{out}: already published from this input with these options; nothing to do")
        return meta
    raise DatasetError(
        f"{storage.join(out, fmt.META_FILE)} already exists and came from another input or "
        "other options: refusing to overwrite a published dataset; choose a new output or "
        "remove it first"
    )


def claim_output(out: str, progress_uri: str, settings: dict[str, Any]) -> None:
    """Record what this import writes; refuse to mix with a half-finished different one."""
    plan_uri = storage.join(progress_uri, "plan.json")
    if storage.exists(plan_uri):
        previous = json.loads(storage.read_text(plan_uri))
        if previous != settings:
            raise DatasetError(
                f"{out} holds an unfinished import of another input or with other options "
                f"(see {plan_uri}); remove {out} or choose another output"
            )
        return
    storage.makedirs(progress_uri)
    storage.write_text_atomic(plan_uri, json.dumps(settings, sort_keys=True))


def write_import_shard(
    out: str, index: int, *, rows: Iterator[Row | str], progress: Progress
) -> dict[str, Any]:
    columns: dict[str, list[Any]] = {name: [] for name in fmt.SCHEMA.names}
    skipped: list[str] = []
    max_label = -1
    for row in rows:
        progress.update()
        if isinstance(row, str):
            skipped.append(row)
            continue
        columns["image"].append(row.image)
        columns["label"].append(row.label)
        columns["identity"].append(row.identity)
        columns["image_id"].append(row.image_id)
        max_label = max(max_label, row.label)
    name = fmt.shard_name(index)
    shard = fmt.write_shard(out, name, columns) if columns["image"] else ShardInfo(name, 0, 0)
    return {"shard": asdict(shard), "max_label": max_label, "skipped": skipped}


def import_pairs(out: str, meta: DatasetMeta, options: ImportOptions) -> Any:
    """Verification pairs drawn from the written shards' ids and labels."""
    image_ids: list[str] = []
    labels: list[int] = []
    for table in fmt.iter_shards(out, meta, columns=["image_id", "label"]):
        image_ids.extend(table.column("image_id").to_pylist())
        labels.extend(table.column("label").to_pylist())
    pairs = make_pairs(image_ids, labels, pairs_per_fold=options.pairs_per_fold, seed=options.seed)
    same = sum(pairs.column("same").to_pylist())
    print(
        f"[pairs] {pairs.num_rows} verification pairs written ({same} same-identity, "
        f"{pairs.num_rows - same} different-identity, each at most once) in {fmt.NUM_FOLDS} "
        f"folds; {pair_draw.single_image_identities(labels)} identities with a single image "
        "make no pair and are left out",
        flush=True,
    )
    return pairs


def checked(make: Callable[[], Row], on_corrupt: OnCorrupt) -> Row | str:
    """``make()``, or under ``on_corrupt=skip`` the reason it failed."""
    try:
        return make()
    except CorruptImageError as err:
        if on_corrupt is OnCorrupt.ERROR:
            raise
        return str(err)


def scan_image_folder(root: str) -> list[tuple[str, list[str]]]:
    """(identity, sorted image paths) per sub-folder of ``root``, identities sorted by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory (expected one sub-folder per identity)")
    identities = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        files = sorted(
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if f.lower().endswith(IMAGE_SUFFIXES)
        )
        for path in (folder, *files):
            check_utf8_name(path)
        if files:
            identities.append((name, files))
    if not identities:
        raise FileNotFoundError(f"{root}: no sub-folders with images ({', '.join(IMAGE_SUFFIXES)})")
    return identities


def check_utf8_name(path: str) -> None:
    """Identity names and image paths are recorded as UTF-8 text (labels, dataset.json,
    the source fingerprint): a name in another encoding is refused, naming it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path)
        raise DatasetError(
            f"{shown!r}: the name is not UTF-8 text; identity folders and image files must "
            "have UTF-8 names (rename it, e.g. with convmv)"
        ) from None


def write_image_folder(options: FolderImport) -> DatasetMeta:
    """One sub-folder per identity -> the dataset format, labels in sorted folder order.

    A file that cannot be decoded stops the import with its path, unless ``on_corrupt`` is
    ``skip``: then it is left out, counted, and listed in ``dataset.json``.
    """
    folders = scan_image_folder(options.input)
    if options.identities:
        chosen = folders[identity_slice(options.identities)]
        if not chosen:
            raise DatasetError(
                f"{options.input}: --identities {options.identities} selects none of its "
                f"{len(folders)} identity folders"
            )
        folders = chosen
    if options.pairs_per_fold:  # refused before any image is read, not after the import
        pair_draw.check_pair_identities(sum(len(files) >= 2 for _, files in folders))
    names = [name for name, _ in folders]
    items = [(label, path) for label, (_, files) in enumerate(folders) for path in files]
    sizes = [os.path.getsize(path) for _, path in items]
    root = os.path.abspath(options.input)
    listing = (
        f"{os.path.relpath(path, root)}\t{size}"
        for (_, path), size in zip(items, sizes, strict=True)
    )

    def make_rows(shard: Sequence[tuple[int, str]]) -> Iterator[Row | str]:
        for label, path in shard:

            def make(label: int = label, path: str = path) -> Row:
                image = encode_jpeg(load_image_file(path, options.image_size), options.jpeg_quality)
                name = names[label]
                return Row(image, label, name, f"{name}/{os.path.basename(path)}")

            yield checked(make, options.on_corrupt)

    plan = ImportPlan(
        source={
            "kind": "image_folder",
            "path": root,
            "identities": options.identities or ":",
            "fingerprint": fingerprint_lines(listing),
        },
        shards=plan_shards(items, sizes, options.shard_bytes),
        make_rows=make_rows,
        identities=lambda _max_label: names,
    )
    return run_import(plan, options, "import")
