"""Import a folder of face images (one sub-folder per identity) into the dataset format.

Locally:
    python -m jobs.prepare_dataset --input ../shared/datasets/orl_faces --out runs/data/orl --pairs-per-fold 60
On a cluster:
    ray job submit --working-dir . -- python -m jobs.prepare_dataset --input /mnt/faces --out s3://bucket/faces

JPEG/PNG/PGM (anything Pillow reads); grey images become 3-channel; each image is scaled to
fit --image-size and centred on a black square. An undecodable file stops the import with
its path, unless --on-corrupt skip (then it is counted and listed in dataset.json).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.config import OnCorrupt
from orchestrator.data.prepare import FolderImport, write_image_folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare_dataset", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", required=True, help="folder with one sub-folder per identity")
    parser.add_argument("--out", required=True, help="output directory or object-store URI")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument(
        "--on-corrupt", choices=[o.value for o in OnCorrupt], default=OnCorrupt.ERROR.value
    )
    parser.add_argument(
        "--pairs-per-fold", type=int, default=0, help="also write 10-fold verification pairs"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = FolderImport(
        input=args.input,
        out=args.out,
        image_size=args.image_size,
        on_corrupt=OnCorrupt(args.on_corrupt),
        pairs_per_fold=args.pairs_per_fold,
        seed=args.seed,
    )
    meta = write_image_folder(options)
    print(
        f"{meta.num_classes} identities, {meta.num_images} images, {len(meta.skipped)} skipped -> {args.out}"
    )
    for reason in meta.skipped:
        print(f"  skipped: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
