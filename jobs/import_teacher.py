"""Import a teacher you own (an insightface arcface_torch backbone, a model-zoo ONNX file, a
TorchScript module) as a teacher directory the configs point to, with a model card.

Locally:
    python -m jobs.import_teacher --backbone model.pt --format insightface --arch iresnet50 --out runs/teachers/r50
    python -m jobs.import_teacher --backbone model.pt --arch iresnet50 --partial-fc /path/to/arcface_torch/output --dataset runs/data/webface --out runs/teachers/r50
    python -m jobs.import_teacher --backbone w600k_r50.onnx --out runs/teachers/buffalo_l_r50
On a cluster:
    ray job submit --working-dir . -- python -m jobs.import_teacher --backbone s3://bucket/zoo/r50.onnx --out s3://bucket/teachers/r50

The backbone is loaded (every key of an insightface state dict consumed and shape-checked,
nothing that runs code accepted) and run once before anything is written. teacher.input
(another input geometry) comes from --config/--set. Writes backbone.pt or backbone.onnx
(the source, byte for byte), classifier/ (with --partial-fc), teacher.yaml (the teacher:
section to put in a config), model_card.json and model_card.md (source checksums,
architecture, input convention, embedding width). Exit 2 on a file that does not fit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from orchestrator import cli
from orchestrator.config import Arch, TeacherFormat
from orchestrator.teacher.importing import import_teacher


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.import_teacher", description=cli.description(__doc__)
    )
    parser.add_argument("--backbone", required=True, help="the teacher file (local or URI)")
    parser.add_argument(
        "--format", choices=[f.value for f in TeacherFormat], help="default: teacher.format (auto)"
    )
    parser.add_argument("--arch", choices=[a.value for a in Arch], help="insightface: its arch")
    parser.add_argument("--emb-dim", type=int, help="its embedding width (default teacher.emb_dim)")
    parser.add_argument("--partial-fc", help="arcface_torch output directory with the W shards")
    parser.add_argument("--dataset", help="the dataset W's rows refer to (with --partial-fc)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--out", required=True, help="the teacher directory to write")
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    teacher = replace(config.teacher, backbone=args.backbone)
    if args.format:
        teacher = replace(teacher, format=TeacherFormat(args.format))
    if args.arch:
        teacher = replace(teacher, arch=Arch(args.arch))
    if args.emb_dim:
        teacher = replace(teacher, emb_dim=args.emb_dim)
    card = import_teacher(
        teacher,
        out=args.out,
        partial_fc=args.partial_fc,
        dataset=args.dataset,
        image_size=config.data.image_size,
        dtype=args.dtype,
    )
    print(
        f"teacher {card['arch'] or card['format']} ({card['format']}, {card['emb_dim']}-d) -> "
        f"{args.out}: {card['backbone'].rsplit('/', 1)[-1]}, teacher.yaml, model_card.json, "
        f"model_card.md{', classifier/' if card['classifier'] else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
