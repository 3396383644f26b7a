"""Build the teacher classifier the student inherits (format: README "Formats").

Three sources:
    python -m jobs.build_classifier checkpoint --teacher runs/teacher/teacher.pt --dataset runs/data/synthetic/train --out runs/teacher/classifier
    python -m jobs.build_classifier arcface-torch --run-dir /path/to/arcface_torch/output --dataset DATA --out OUT
    python -m jobs.build_classifier mean-embedding --teacher backbone.onnx --dataset DATA --out OUT
On a cluster:
    ray job submit --working-dir . -- python -m jobs.build_classifier checkpoint --teacher ... --dataset s3://... --out s3://...
    ray job submit --working-dir . -- python -m jobs.build_classifier mean-embedding --config configs/my.yaml --teacher s3://.../r50.onnx --dataset s3://... --out s3://... --actors 8

mean-embedding is an approximation (class centres of the teacher's features instead of its
trained classifier) for teachers whose head is lost; meta.json records it as such. The
teacher may be in any format (teacher.format, teacher.input from --config/--set; README
"Bring your own teacher"). It runs on Ray (an actor pool embeds, reducers sum per identity
range, so nothing holds all of W); --local runs it in this one process instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from orchestrator import cli
from orchestrator.data import format as fmt
from orchestrator.mean_embedding import MeanEmbeddingPlan, build_on_ray
from orchestrator.teacher import (
    classifier_from_arcface_torch,
    classifier_from_checkpoint,
    classifier_from_mean_embeddings,
    load_teacher_backbone,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.build_classifier", description=cli.description(__doc__)
    )
    parser.add_argument("source", choices=["checkpoint", "arcface-torch", "mean-embedding"])
    parser.add_argument(
        "--dataset", required=True, help="the dataset the classifier's labels refer to"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--teacher", help="teacher checkpoint (checkpoint) or backbone/TorchScript (mean-embedding)"
    )
    parser.add_argument("--run-dir", help="arcface_torch output directory (arcface-torch)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    me = parser.add_argument_group("mean-embedding")
    me.add_argument("--local", action="store_true", help="one process instead of Ray")
    me.add_argument("--actors", type=int, default=1, help="embedding actors (a GPU each if any)")
    me.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per CPU actor")
    me.add_argument("--batch-size", type=int, default=64, help="images per actor batch")
    me.add_argument(
        "--identities-per-range",
        type=int,
        default=0,
        help="identities per reducer (default: one 64 MiB chunk's rows)",
    )
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    meta = fmt.read_meta(args.dataset)
    if args.source == "arcface-torch":
        if not args.run_dir:
            parser.error("arcface-torch needs --run-dir")
        built = classifier_from_arcface_torch(
            args.run_dir,
            args.out,
            num_classes=meta.num_classes,
            dataset_fingerprint=meta.label_map_fingerprint,
            dtype=args.dtype,
        )
    else:
        if not args.teacher:
            parser.error(f"{args.source} needs --teacher")
        if args.source == "checkpoint":
            built = classifier_from_checkpoint(
                args.teacher,
                args.out,
                dataset_fingerprint=meta.label_map_fingerprint,
                dtype=args.dtype,
            )
        else:
            config = cli.config_from_args(args)
            teacher = replace(config.teacher, backbone=args.teacher)
            if args.local:
                backbone = load_teacher_backbone(teacher, image_size=config.data.image_size)
                built = classifier_from_mean_embeddings(
                    backbone, args.dataset, out=args.out, dtype=args.dtype
                )
            else:
                plan = MeanEmbeddingPlan(
                    actors=args.actors,
                    batch_size=args.batch_size,
                    actor_cpus=args.actor_cpus,
                    identities_per_range=args.identities_per_range,
                    dtype=args.dtype,
                )
                built = build_on_ray(
                    teacher,
                    args.dataset,
                    out=args.out,
                    image_size=config.data.image_size,
                    plan=plan,
                )
    print(f"classifier {built.num_classes} x {built.emb_dim} ({built.dtype}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
