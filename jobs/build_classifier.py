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
range, so nothing holds all of W); --local runs it in this one process instead. Its
meta.json records the teacher, its format and the teacher.input it was embedded with.

--teacher defaults to the config's teacher.backbone and --out to its teacher.classifier,
so `--config my.yaml` alone names both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from orchestrator import cli, storage
from orchestrator.config import to_dict
from orchestrator.data import format as fmt
from orchestrator.errors import UsageError
from orchestrator.teacher.classifiers import (
    classifier_from_arcface_torch,
    classifier_from_checkpoint,
    classifier_from_mean_embeddings,
    load_teacher_backbone,
)
from orchestrator.teacher.mean_embedding import MeanEmbeddingPlan, build_on_ray, teacher_source


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.build_classifier", description=cli.description(__doc__)
    )
    parser.add_argument("source", choices=["checkpoint", "arcface-torch", "mean-embedding"])
    parser.add_argument(
        "--dataset", required=True, help="the dataset the classifier's labels refer to"
    )
    parser.add_argument(
        "--out", help="where to write it (default: the config's teacher.classifier)"
    )
    parser.add_argument(
        "--teacher",
        help="teacher checkpoint (checkpoint) or backbone in any teacher format (mean-embedding); "
        "default: the config's teacher.backbone",
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
    config = cli.config_from_args(args)
    args.out = args.out or config.teacher.classifier
    args.teacher = args.teacher or config.teacher.backbone
    if not args.out:
        raise UsageError("--out: no output given and the config has no teacher.classifier")
    if min(args.actors, args.batch_size) < 1 or args.actor_cpus <= 0:
        raise UsageError(
            f"--actors and --batch-size must be >= 1 and --actor-cpus > 0, found "
            f"{args.actors}, {args.batch_size} and {args.actor_cpus}"
        )
    if storage.exists(args.out) and not storage.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file: expected a classifier directory")
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
            raise UsageError(f"{args.source} needs --teacher or a config with teacher.backbone")
        if args.source == "checkpoint":
            built = classifier_from_checkpoint(
                args.teacher,
                args.out,
                dataset_fingerprint=meta.label_map_fingerprint,
                dtype=args.dtype,
            )
        else:
            teacher = replace(config.teacher, backbone=args.teacher)
            convention = ", ".join(f"{k} {v}" for k, v in to_dict(teacher.input).items())
            where = f"--config {args.config}" if args.config else "no --config: the defaults"
            print(f"[mean embeddings] teacher.input ({where}): {convention}", flush=True)
            if args.local:
                backbone = load_teacher_backbone(teacher, image_size=config.data.image_size)
                built = classifier_from_mean_embeddings(
                    backbone,
                    args.dataset,
                    out=args.out,
                    dtype=args.dtype,
                    teacher=teacher_source(teacher),
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
