"""How hard is the synthetic set? 10-fold accuracy on held-out identities of a random-init
student and of the same student after a short single-process training run.

    python bench/synthetic_difficulty.py [--config configs/demo.yaml] [--epochs 3] [--set ...]

Trains with the `scratch` objective (the student's own ArcFace classifier), so no teacher is
needed. Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch

from orchestrator import cli, storage
from orchestrator.config import Method
from orchestrator.data import format as fmt
from orchestrator.data.images import to_model_input
from orchestrator.data.prepare import write_synthetic
from orchestrator.evaluation import evaluate_model, load_eval_set
from orchestrator.losses import build_loss
from orchestrator.models import build_backbone
from orchestrator.progress import Progress
from orchestrator.teacher.classifiers import iter_dataset_batches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=" ".join((__doc__ or "").strip().split("\n\n")[0].split())
    )
    cli.add_config_args(parser)
    parser.set_defaults(config="configs/demo.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    if not storage.exists(storage.join(config.data.eval, fmt.META_FILE)):
        write_synthetic(config.synthetic)
    torch.manual_seed(config.seed)
    torch.set_num_threads(2)
    meta = fmt.read_meta(config.data.train)
    eval_set = load_eval_set(config.data.eval)
    student = build_backbone(
        config.student.arch,
        config.student.emb_dim,
        dropout=config.student.dropout,
        input_size=config.data.image_size,
    )
    before = evaluate_model(student, eval_set)

    loss_config = type(config.loss)(**{**config.loss.__dict__, "method": Method.SCRATCH})
    loss_fn = build_loss(loss_config, num_classes=meta.num_classes, emb_dim=config.student.emb_dim)
    params = list(student.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(params, lr=config.optim.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * (meta.num_images // args.batch_size + 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.optim.lr, total_steps=steps
    )
    rng = np.random.default_rng(config.seed)
    # The whole (small) training set in memory, shuffled per epoch.
    images, labels = zip(*iter_dataset_batches(config.data.train, meta, 512), strict=True)
    all_images, all_labels = np.concatenate(images), np.concatenate(labels)
    progress = Progress("train", steps, unit="steps", every_s=10)
    student.train()
    for _ in range(args.epochs):
        order = rng.permutation(len(all_labels))
        for lo in range(0, len(order), args.batch_size):
            idx = order[lo : lo + args.batch_size]
            x = to_model_input(all_images[idx])
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x[flip] = torch.flip(x[flip], dims=[3])
            out = loss_fn(student(x), torch.from_numpy(all_labels[idx]))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update(extra=f"loss {out.terms['ce']:.3f}")
    train_seconds = progress.close()
    after = evaluate_model(student, eval_set)
    result = {
        "arch": config.student.arch.value,
        "train_identities": meta.num_classes,
        "train_images": meta.num_images,
        "eval_identities": eval_set.num_classes,
        "eval_pairs": int(eval_set.same.size),
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "random_init_acc": round(before["acc_10fold"], 4),
        "trained_acc": round(after["acc_10fold"], 4),
        "trained_acc_std": round(after["acc_10fold_std"], 4),
        "random_init_rank1": round(before["rank1"], 4),
        "trained_rank1": round(after["rank1"], 4),
    }
    print("| student | 10-fold acc | rank-1 | AUC |")
    print("|---|---|---|---|")
    print(
        f"| random init | {before['acc_10fold']:.4f} | {before['rank1']:.4f} | {before['auc']:.4f} |"
    )
    print(
        f"| trained {args.epochs} epochs ({train_seconds:.0f}s) | {after['acc_10fold']:.4f} ± {after['acc_10fold_std']:.4f} | {after['rank1']:.4f} | {after['auc']:.4f} |"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
