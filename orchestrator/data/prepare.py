"""Writers that turn a source of faces into the dataset format of :mod:`.format`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.config import OnCorrupt, SyntheticConfig
from orchestrator.data.format import DatasetMeta, DatasetWriter, make_pairs
from orchestrator.data.images import CorruptImageError, encode_jpeg, load_image_file
from orchestrator.data.synthetic import iter_identity_images
from orchestrator.progress import Progress

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
    writer = DatasetWriter(out, config.image_size, config.shard_bytes, source)
    names, image_ids, labels = [], [], []
    progress = Progress(
        f"synthesize {os.path.basename(out.rstrip('/'))}",
        len(identities) * config.images_per_identity,
    )
    for label, identity in enumerate(identities):
        name = f"synth{identity:07d}"
        names.append(name)
        images = iter_identity_images(
            config.seed, identity, config.images_per_identity, config.image_size
        )
        for index, image in enumerate(images):
            image_id = f"{name}/{index:03d}"
            writer.add(encode_jpeg(image, config.jpeg_quality), label, name, image_id)
            if pairs:
                image_ids.append(image_id)
                labels.append(label)
            progress.update()
    progress.close()
    table = make_pairs(image_ids, labels, config.pairs_per_fold, config.seed) if pairs else None
    return writer.publish(names, pairs=table)


@dataclass(frozen=True)
class FolderImport:
    """Options of ``python -m jobs.prepare_dataset`` in folder mode."""

    input: str
    out: str
    image_size: int = 112
    on_corrupt: OnCorrupt = OnCorrupt.ERROR
    pairs_per_fold: int = 0  # 0: no verification pairs
    seed: int = 0
    jpeg_quality: int = 95
    shard_bytes: int = 256 * 2**20


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
        if files:
            identities.append((name, files))
    if not identities:
        raise FileNotFoundError(f"{root}: no sub-folders with images ({', '.join(IMAGE_SUFFIXES)})")
    return identities


def write_image_folder(options: FolderImport) -> DatasetMeta:
    """One sub-folder per identity -> the dataset format, labels in sorted folder order.

    A file that cannot be decoded stops the import with its path, unless ``on_corrupt`` is
    ``skip``: then it is left out, counted, and listed in ``dataset.json``.
    """
    folders = scan_image_folder(options.input)
    total = sum(len(files) for _, files in folders)
    writer = DatasetWriter(
        options.out,
        options.image_size,
        options.shard_bytes,
        {"kind": "image_folder", "path": os.path.abspath(options.input)},
    )
    names: list[str] = []
    image_ids: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    progress = Progress("import", total)
    for name, files in folders:
        label = len(names)
        kept = 0
        for path in files:
            progress.update()
            try:
                image = load_image_file(path, options.image_size)
            except CorruptImageError as err:
                if options.on_corrupt is OnCorrupt.ERROR:
                    raise
                skipped.append(str(err))
                continue
            image_id = f"{name}/{os.path.basename(path)}"
            writer.add(encode_jpeg(image, options.jpeg_quality), label, name, image_id)
            image_ids.append(image_id)
            labels.append(label)
            kept += 1
        if kept:
            names.append(name)
    progress.close(f"{len(skipped)} skipped" if skipped else "")
    pairs = (
        make_pairs(image_ids, labels, options.pairs_per_fold, options.seed)
        if options.pairs_per_fold
        else None
    )
    return writer.publish(names, skipped=skipped, pairs=pairs)
