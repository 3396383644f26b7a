"""Import faces into the dataset format: Parquet shards + dataset.json, local or on object storage.

Locally, from an image folder (one sub-folder per identity) or an insightface RecordIO pair:
    python -m jobs.prepare_dataset --input ../shared/datasets/orl_faces --out runs/data/orl/train --identities 0:20
    python -m jobs.prepare_dataset --input ../shared/datasets/orl_faces --out runs/data/orl/eval --identities 20: --pairs-per-fold 20
    python -m jobs.prepare_dataset --recordio /data/faces_emore/train.rec --out s3://bucket/emore
    python -m jobs.prepare_dataset --eval-set runs/data/orl/eval --out runs/bench/orl_eval.bin
On a cluster:
    ray job submit --working-dir . -- python -m jobs.prepare_dataset --recordio s3://bucket/raw/train.rec --out s3://bucket/faces

Shards are about --shard-mb each (256 by default). Rerunning with the same input and output
skips the shards already written (after a crash or an interruption); dataset.json is written
last, so a half-written dataset is never readable as complete. Object-store credentials and
endpoint come from the standard AWS_* environment (or the instance role) and are never printed.

Folder mode: JPEG/PNG/PGM (anything Pillow reads); grey images become 3-channel; each image
is scaled to fit --image-size and centred on a black square. RecordIO mode (no MXNet needed):
train.idx is read from beside train.rec unless --idx is given; labels are kept as stored;
JPEGs already at --image-size are kept byte for byte. An undecodable image stops the import
naming it, unless --on-corrupt skip (then it is counted and listed in dataset.json).

Eval-set mode freezes one of our eval sets (with pairs) as an insightface .bin, the format
jobs.evaluate --benchmark and run.val_targets read: pairs ordered by fold, so a set whose
folds are equal keeps them under the .bin protocol (10 contiguous folds in file order).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.benchmarks.suite import bin_from_eval_set
from orchestrator.benchmarks.verification_bin import write_bin
from orchestrator.config import OnCorrupt
from orchestrator.data.format import DatasetMeta
from orchestrator.data.prepare import FolderImport, write_image_folder
from orchestrator.data.recordio_import import RecordIOImport, write_recordio
from orchestrator.errors import UsageError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare_dataset", description=cli.description(__doc__)
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="folder with one sub-folder per identity")
    source.add_argument("--recordio", help="insightface train.rec (local path or URI)")
    source.add_argument(
        "--eval-set",
        help="one of our eval sets with pairs: written to --out as an insightface .bin",
    )
    parser.add_argument("--idx", default="", help="the .idx of --recordio (default: beside it)")
    parser.add_argument("--out", required=True, help="output directory or object-store URI")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument(
        "--on-corrupt", choices=[o.value for o in OnCorrupt], default=OnCorrupt.ERROR.value
    )
    parser.add_argument(
        "--pairs-per-fold", type=int, default=0, help="also write 10-fold verification pairs"
    )
    parser.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="when images are re-encoded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--identities",
        default="",
        metavar="START:STOP",
        help="--input only: a range of the identity folders sorted by name, e.g. 0:30 for "
        "training and 30: for a held-out evaluation set",
    )
    args = parser.parse_args(argv)
    if args.identities and not args.input:
        parser.error("--identities applies to --input (an image folder)")
    common = {
        "out": args.out,
        "image_size": args.image_size,
        "on_corrupt": OnCorrupt(args.on_corrupt),
        "pairs_per_fold": args.pairs_per_fold,
        "seed": args.seed,
        "jpeg_quality": args.jpeg_quality,
        "shard_bytes": int(args.shard_mb * 2**20),
    }
    if args.eval_set:
        return freeze_bin(args.eval_set, args.out)
    meta: DatasetMeta
    if args.input:
        meta = write_image_folder(
            FolderImport(input=args.input, identities=args.identities, **common)
        )
    else:
        meta = write_recordio(RecordIOImport(rec=args.recordio, idx=args.idx, **common))
    print(
        f"{meta.num_classes} identities, {meta.num_images} images in {len(meta.files)} shards, "
        f"{len(meta.skipped)} skipped -> {args.out}"
    )
    for reason in meta.skipped:
        print(f"  skipped: {reason}")
    return 0


def freeze_bin(eval_set: str, out: str) -> int:
    """An eval set's pairs as a .bin (pairs ordered by fold, JPEGs byte for byte)."""
    if not out.endswith(".bin"):
        raise UsageError(
            f"--eval-set writes an insightface .bin: --out must end in .bin, found {out!r}"
        )
    vb = bin_from_eval_set(eval_set)
    write_bin(out, list(vb.images), vb.issame)
    print(f"{vb.num_pairs} pairs ({int(vb.issame.sum())} same) from {eval_set} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
