"""Generate the synthetic-identity dataset: train/ and eval/ (held-out identities + pairs).

Locally:
    python -m jobs.synthesize --config configs/demo.yaml
On a cluster:
    ray job submit --working-dir . -- python -m jobs.synthesize --config configs/demo.yaml --set synthetic.out=s3://bucket/synthetic

Same config and seed, byte-identical output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.data.prepare import write_synthetic


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.synthesize", description=cli.description(__doc__)
    )
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    result = write_synthetic(config.synthetic)
    for name, meta, uri in (
        ("train", result.train, result.train_uri),
        ("eval", result.eval, result.eval_uri),
    ):
        print(f"{name}: {meta.num_classes} identities, {meta.num_images} images -> {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
