"""Object storage end to end, against a real S3 server (SeaweedFS) on loopback: dataset
import, 2-worker training that streams s3:// through Ray Data, checkpoints on s3://,
evaluation reading them back; bad credentials, a missing bucket, broken data."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs import evaluate, prepare_dataset
from orchestrator import cli, storage
from orchestrator.config import RunConfig, SyntheticConfig, to_dict
from orchestrator.config.data import DecodeAt
from orchestrator.data import format as fmt
from orchestrator.data.images import CorruptImageError, encode_jpeg
from orchestrator.data.prepare import SyntheticDatasets, write_synthetic
from orchestrator.data.synthetic import iter_identity_images
from orchestrator.objectstore import EmbeddedObjectStore
from orchestrator.runs import student_uri
from orchestrator.train.launch import distill
from tests.conftest import BUCKET, REPO, make_train_setup

pytestmark = pytest.mark.usefixtures("ray_cluster")  # its workers read the S3 server

IDENTITIES, PER_IDENTITY = 6, 4


def face_folder(root: Path) -> Path:
    """IDENTITIES sub-folders of PER_IDENTITY JPEG faces, the layout of an image folder."""
    for identity in range(IDENTITIES):
        folder = root / f"person{identity:02d}"
        folder.mkdir(parents=True)
        for i, face in enumerate(
            iter_identity_images(7, identity, images_per_identity=PER_IDENTITY, size=112)
        ):
            (folder / f"{i}.jpg").write_bytes(encode_jpeg(face, 95))
    return root


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDatasets:
    """Training faces imported by the real CLI straight into s3://; held-out pairs too."""
    prefix = f"s3://{BUCKET}/e2e"
    folder = face_folder(tmp_path_factory.mktemp("faces"))
    train = f"{prefix}/train"
    code = prepare_dataset.main(["--input", str(folder), "--out", train, "--shard-mb", "0.02"])
    assert code == 0
    held_out = write_synthetic(
        SyntheticConfig(
            out=f"{prefix}/synthetic",
            num_identities=2,
            eval_identities=20,
            images_per_identity=3,
            pairs_per_fold=4,
        )
    )
    return SyntheticDatasets(
        fmt.read_meta(train), held_out.eval, train_uri=train, eval_uri=held_out.eval_uri
    )


def test_two_workers_stream_s3_and_split_every_epoch_exactly(
    s3_data: SyntheticDatasets, tmp_path: Path
) -> None:
    assert len(s3_data.train.files) >= 3  # several shards to shuffle and split
    setup = make_train_setup(f"s3://{BUCKET}/e2e/teacher", s3_data)
    config = replace(
        setup.base,
        name="s3run",
        storage_path=f"s3://{BUCKET}/e2e/runs",
        data=replace(setup.base.data, decode=DecodeAt.POOL),  # read tasks and the decode pool
        run=RunConfig(eval_every_epochs=0, log_every_s=5.0, shuffle_buffer=0, audit_ids=True),
    )
    outcome = distill(config)
    assert outcome.state.history.epochs_done == (0, 1)
    assert outcome.checkpoint_path.startswith(f"{BUCKET}/e2e/runs/s3run")  # on the store
    assert np.isfinite(outcome.metrics["val_acc_10fold"])

    all_ids = {f"person{i:02d}/{j}.jpg" for i in range(IDENTITIES) for j in range(PER_IDENTITY)}
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            uri = f"s3://{BUCKET}/e2e/runs/s3run/audit/epoch-{epoch:04d}-rank-{rank:03d}.txt"
            seen.append(storage.read_text(uri).split())
        assert len(seen[0]) == len(seen[1]) == len(all_ids) // 2  # equal parts
        assert not set(seen[0]) & set(seen[1])  # disjoint
        counts = Counter(seen[0] + seen[1])
        assert set(counts) == all_ids and set(counts.values()) == {1}  # each image once

    # Evaluation reads the exported student back from the store, report written there.
    student = student_uri(config, "s3run")
    assert student.startswith("s3://") and storage.exists(student)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    report = f"s3://{BUCKET}/e2e/report"
    code = evaluate.main(
        ["--config", str(config_file), "--student", f"kd={student}", "--out", report]
    )
    assert code == 0
    for name in ("report.json", "report.md", "roc.png"):
        assert storage.exists(f"{report}/{name}")
    assert '"kd"' in storage.read_text(f"{report}/report.json")


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_wrong_credentials_fail_clearly_and_never_show_the_secret(
    object_store: EmbeddedObjectStore, s3_data: SyntheticDatasets, tmp_path: Path
) -> None:
    secret = "wrong-secret-Zq81xKp0vT"
    folder = face_folder(tmp_path / "faces")
    out = f"s3://{BUCKET}/e2e/denied"
    commands = [
        ["-m", "jobs.prepare_dataset", "--input", str(folder), "--out", out],
        [
            "-m", "jobs.evaluate", "--no-teacher",
            "--set", f"data.eval={s3_data.eval_uri}",
            "--student", f"x=s3://{BUCKET}/e2e/runs/s3run/student.pt",
        ],
    ]  # fmt: skip
    for command in commands:
        result = run_cli(command, {"AWS_SECRET_ACCESS_KEY": secret})
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "access denied" in output and "AWS_SECRET_ACCESS_KEY" in output
        assert "s3://" in output  # names the object
        assert secret not in output
        assert object_store.endpoint.secret_key not in output
    assert not object_store.client().exists(f"{BUCKET}/e2e/denied/dataset.json")


def test_missing_bucket_is_named(tmp_path: Path) -> None:
    folder = face_folder(tmp_path / "faces")
    result = run_cli(
        ["-m", "jobs.prepare_dataset", "--input", str(folder), "--out", "s3://no-such-bucket/x"], {}
    )
    assert result.returncode == 2
    assert "bucket 'no-such-bucket' does not exist at http://127.0.0.1:" in result.stderr


def test_truncated_parquet_on_s3_is_named_before_training(s3_data: SyntheticDatasets) -> None:
    prefix = f"s3://{BUCKET}/e2e/truncated"
    broken = write_synthetic(
        SyntheticConfig(out=prefix, num_identities=4, eval_identities=20, shard_bytes=20_000)
    )
    victim = f"{broken.train_uri}/{broken.train.files[1].name}"
    data = storage.read_bytes(victim)
    storage.write_bytes_atomic(victim, data[: len(data) // 2])
    setup = make_train_setup(f"{prefix}/teacher", broken)
    with pytest.raises(fmt.DatasetError, match=rf"{victim}: cannot read Parquet shard"):
        distill(replace(setup.base, name="truncated", storage_path=f"{prefix}/runs"))


def test_corrupt_jpeg_in_training_data_names_the_image(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = f"s3://{BUCKET}/e2e/corrupt"
    clean = write_synthetic(
        SyntheticConfig(out=f"{prefix}/synthetic", num_identities=2, eval_identities=20)
    )
    writer = fmt.DatasetWriter(f"{prefix}/train", 112, shard_bytes=2**20, source={"kind": "test"})
    for table in fmt.iter_shards(clean.train_uri, clean.train):
        for row in table.to_pylist():
            image = row["image"][:300] if row["image_id"] == "synth0000001/005" else row["image"]
            writer.add(image, row["label"], row["identity"], row["image_id"])
    names = fmt.read_identities(clean.train_uri, clean.train)
    meta = writer.publish(names)
    data = SyntheticDatasets(meta, clean.eval, f"{prefix}/train", clean.eval_uri)
    setup = make_train_setup(f"{prefix}/teacher", data)
    config = replace(
        setup.base,
        name="corrupt",
        storage_path=f"{prefix}/runs",
        data=replace(setup.base.data, decode=DecodeAt.POOL),
    )
    # Raised in a decode actor, re-raised in the worker and then in the driver as itself.
    with pytest.raises(
        CorruptImageError, match=r"image_id synth0000001/005: cannot decode JPEG"
    ) as caught:
        distill(config)

    def distill_main(argv: Sequence[str] | None) -> int:
        """jobs.distill's main as it ended above (one failed run is enough to show both)."""
        raise caught.value

    # What the command line makes of it: one error line, exit code 2.
    capsys.readouterr()
    assert cli.run(distill_main, []) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset s3://"), lines
    assert "image_id synth0000001/005: cannot decode JPEG" in lines[0]
    assert "(traceback: " in lines[0]  # the workers' failure, as Ray reported it, in a log
