"""Hostile and broken inputs, table-driven: every row runs one job's real CLI (in-process,
``cli.run``) against a crafted or broken input and asserts exit 2, exactly one ``error:``
line and no traceback, and that nothing outside the job's own output changed (a hash of a
sentinel directory and of the inputs, before and after). A new job or input class joins
by adding a row to ``CASES``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import (
    build_classifier,
    compare,
    demo,
    distill,
    evaluate,
    export,
    import_teacher,
    prepare_dataset,
    retrain,
    synthesize,
    train_teacher,
    tune,
)
from orchestrator import classifier as clf
from orchestrator import cli, runs
from orchestrator.data import format as fmt
from orchestrator.data.images import encode_jpeg
from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.data.synthetic import render_image
from tests.conftest import REPO, TrainSetup, clean_env
from tests.test_benchmarks import write_ijb_tree


@dataclass(frozen=True)
class Workspace:
    root: Path  # the job's own output goes under root / "out"
    sentinel: Path  # files no job may touch: the targets of crafted names
    data: SyntheticDatasets

    @property
    def out(self) -> Path:
        return self.root / "out"

    def data_args(self) -> list[str]:
        return [
            "--set",
            f"data.train={self.data.train_uri}",
            "--set",
            f"data.eval={self.data.eval_uri}",
        ]


def tree_hash(*roots: Path) -> str:
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")):
            digest.update(str(path).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Case:
    job: str
    what: str
    argv: Callable[[Workspace], list[str]]  # sets the crafted input up, returns the argv
    expect: str  # a fragment of the one error line
    env: tuple[tuple[str, str | None], ...] = ()  # the process environment for this row
    made_nothing: str = ""  # a path under the workspace that must not exist afterwards


MAINS = {
    "demo": demo.main,
    "build_classifier": build_classifier.main,
    "evaluate": evaluate.main,
    "distill": distill.main,
    "compare": compare.main,
    "tune": tune.main,
    "prepare_dataset": prepare_dataset.main,
    "export": export.main,
    "import_teacher": import_teacher.main,
    "synthesize": synthesize.main,
    "train_teacher": train_teacher.main,
    "retrain": retrain.main,
}


def crafted_marker(entry: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        ws.out.mkdir(parents=True)
        marker = {"entries": {entry(ws): "sha256:0"}}
        (ws.out / demo.MARKER).write_text(json.dumps(marker))
        return ["--set", f"storage_path={ws.out}", *ws.data_args()]

    return setup


def demo_failed_then_rerun(ws: Workspace) -> list[str]:
    """A demo that fails on its input makes nothing; the user's own report.md, put there
    afterwards, is then refused by the next demo, not deleted."""
    common = ["--set", f"storage_path={ws.out}", "--set", f"data.eval={ws.data.eval_uri}"]
    assert cli.run(demo.main, [*common, "--set", f"data.train={ws.root / 'nothing'}"]) == 2
    ws.out.mkdir(parents=True, exist_ok=True)
    (ws.out / "report.md").write_text("my own report")
    (ws.sentinel / "report-copy.md").write_text("my own report")
    return [*common, "--set", f"data.train={ws.data.train_uri}"]


def crafted_classifier(chunk: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    """A published classifier in --out whose meta.json names a chunk outside it: the
    rebuild would delete it as an old chunk."""

    def setup(ws: Workspace) -> list[str]:
        meta = fmt.read_meta(ws.data.train_uri)
        out = ws.out / "classifier"
        weight = np.random.default_rng(0).normal(size=(meta.num_classes, 8))
        clf.write_classifier(
            str(out), weight, label_map_fingerprint=meta.label_map_fingerprint, source={}
        )
        data = json.loads((out / "meta.json").read_text())
        data["chunks"][0]["file"] = chunk(ws)
        (out / "meta.json").write_text(json.dumps(data))
        run = ws.root / "arcface"
        run.mkdir()
        torch.save(torch.randn(3, 8), run / "rank_0_softmax_weight.pt")
        torch.save(torch.randn(3, 8), run / "rank_1_softmax_weight.pt")
        return [
            "arcface-torch", "--run-dir", str(run), "--dataset", ws.data.train_uri,
            "--out", str(out),
        ]  # fmt: skip

    return setup


def non_utf8_ijb(ws: Workspace) -> Path:
    """An IJB-C tree whose face list is not text."""
    root = ws.root / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_bytes(b"\xff\xfe\x00 1 1\n")
    for stem in ("name_5pts_score", "template_pair_label"):
        (root / "meta" / f"ijbc_{stem}.txt").write_text("")
    return root


def face_folder(ws: Workspace, name: bytes = b"caf\xe9") -> str:
    """An identity folder holding one real JPEG; by default its name is Latin-1, not UTF-8."""
    root = ws.root / "faces"
    folder = os.fsencode(root) + b"/" + name
    os.makedirs(folder)
    face = render_image(0, 0, image=0, size=32)
    with open(folder + b"/0.jpg", "wb") as f:
        f.write(encode_jpeg(face))
    return str(root)


def random_recordio(ws: Workspace) -> str:
    """Random bytes as train.rec, beside a well-formed .idx that points into them."""
    rec = ws.root / "train.rec"
    rec.write_bytes(np.random.default_rng(0).bytes(4096))
    (ws.root / "train.idx").write_text("0\t0\n1\t100\n")
    return str(rec)


def shardless_dataset(ws: Workspace) -> str:
    """A copy of the training set whose dataset.json lists no shard files."""
    copy = ws.root / "shardless"
    shutil.copytree(ws.data.train_uri, copy)
    meta = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**meta, "files": []}))
    return str(copy)


def positive_pairs_only(ws: Workspace) -> str:
    """A copy of the evaluation set whose pairs.parquet keeps its same-identity pairs only."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    copy = ws.root / "positives"
    shutil.copytree(ws.data.eval_uri, copy)
    meta = fmt.read_meta(str(copy))
    assert meta.pairs is not None
    table = pq.read_table(copy / meta.pairs)
    pq.write_table(table.filter(pc.field("same")), copy / meta.pairs)
    return str(copy)


def damaged_registry(ws: Workspace) -> list[str]:
    """A registry whose champion.json is cut short (a torn copy by hand)."""
    registry = ws.out / "registry"
    registry.mkdir(parents=True)
    (registry / "champion.json").write_text('{"student": "s3://b/champion/stu')
    return [
        "--set", f"retrain.snapshots={Path(ws.data.train_uri).parent}",
        "--set", f"retrain.benchmark={ws.data.eval_uri}",
        "--set", f"retrain.registry={registry}",
        "--set", f"storage_path={ws.out / 'runs'}",
        *ws.data_args(),
    ]  # fmt: skip


def ijb_tree(ws: Workspace, damage: Callable[[Path], None]) -> str:
    """A small IJB-C tree (tests.test_benchmarks), then ``damage`` done to it."""
    root = ws.root / "IJBC"
    write_ijb_tree(root, identities=2)
    damage(root)
    return str(root)


def remove_one_image(root: Path) -> None:
    (root / "loose_crop" / "2.jpg").unlink()


def nan_landmark(root: Path) -> None:
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    fields = lines[1].split()
    lines[1] = " ".join([fields[0], "nan", *fields[2:]])
    path.write_text("\n".join(lines) + "\n")


def broken_yaml(ws: Workspace) -> Path:
    path = ws.root / "broken.yaml"
    path.write_text("data:\n  train: [1, 2\n")
    return path


def evaluate_ijb(tree: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    """``jobs.evaluate`` arguments that score a student on the IJB tree ``tree`` makes
    (the student file is never read: the tree is refused first)."""
    return lambda ws: ["--student", f"a={student_file(ws)}", "--no-eval", "--ijb", tree(ws)]


def student_file(ws: Workspace) -> str:
    path = ws.root / "student.pt"
    path.write_bytes(b"not read: the arguments are refused first")
    return str(path)


CASES = [
    Case(
        "demo",
        "marker entry ../victim",
        crafted_marker(lambda ws: "../sentinel"),
        "entry '../sentinel'",
    ),
    Case(
        "demo", "marker entry, absolute", crafted_marker(lambda ws: str(ws.sentinel)), "is absolute"
    ),
    Case(
        "demo",
        "failed demo, then the user's report",
        demo_failed_then_rerun,
        "report.md exists and was not made by jobs.demo",
    ),
    Case(
        "build_classifier",
        "meta.json chunk ../v.bin",
        crafted_classifier(lambda ws: "../../sentinel/v.bin"),
        "entry '../../sentinel/v.bin'",
    ),
    Case(
        "build_classifier",
        "meta.json chunk, absolute",
        crafted_classifier(lambda ws: str(ws.sentinel / "v.bin")),
        "is absolute",
    ),
    Case(
        "build_classifier",
        "--out naming an existing file",
        lambda ws: [
            "checkpoint",
            "--dataset",
            ws.data.train_uri,
            "--teacher",
            "t.pt",
            "--out",
            str(ws.sentinel / "notes.txt"),
        ],
        "is a file: expected a classifier directory",
    ),
    Case(
        "build_classifier",
        "--actors 0",
        lambda ws: [
            "mean-embedding",
            "--dataset",
            ws.data.train_uri,
            "--out",
            str(ws.out),
            "--actors",
            "0",
        ],
        "--actors and --batch-size must be >= 1",
    ),
    Case(
        "evaluate",
        "a student named teacher",
        lambda ws: ["--student", f"teacher={student_file(ws)}", *ws.data_args()],
        "'teacher' names the report's teacher row",
    ),
    Case(
        "evaluate",
        "two students of one name",
        lambda ws: [
            "--student",
            f"a={student_file(ws)}",
            "--student",
            f"a={student_file(ws)}",
            *ws.data_args(),
        ],
        "--student a is given twice",
    ),
    Case(
        "evaluate",
        "a directory as --student",
        lambda ws: ["--student", f"a={ws.sentinel}", *ws.data_args()],
        "is a directory, expected a student.pt file",
    ),
    Case(
        "evaluate",
        "--ijb-actors 0",
        lambda ws: ["--student", f"a={student_file(ws)}", "--ijb-actors", "0"],
        "--ijb-actors and --ijb-batch must be >= 1",
    ),
    Case(
        "distill",
        "a binary file as --config",
        lambda ws: ["--config", str(ws.sentinel / "random.bin")],
        "expected a YAML text file",
    ),
    Case(
        "distill",
        "a config that is not valid YAML",
        lambda ws: ["--config", str(broken_yaml(ws))],
        "not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1",
    ),
    Case(
        "build_classifier",
        "a missing arcface_torch --run-dir",
        lambda ws: [
            "arcface-torch",
            "--run-dir",
            str(ws.root / "nothing"),
            "--dataset",
            ws.data.train_uri,
            "--out",
            str(ws.out / "classifier"),
        ],
        "nothing: no such directory (expected arcface_torch's output directory",
    ),
    Case(
        "distill",
        "seed -1",
        lambda ws: ["--set", "seed=-1"],
        "seed: a seed must be in [0, 2**63 - 1]",
    ),
    Case(
        "compare",
        "compare.seeds [-1]",
        lambda ws: ["--set", "compare.seeds=[0,-1]"],
        "compare.seeds: a seed must be in",
    ),
    Case(
        "distill",
        "no object-store credentials",
        lambda ws: ["--set", "data.train=s3://bucket/train"],
        "no object-store credentials were found",
        env=(
            ("AWS_ACCESS_KEY_ID", None),
            ("AWS_SECRET_ACCESS_KEY", None),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ),
    ),
    Case(
        "distill",
        "an unreachable endpoint",
        lambda ws: ["--set", "data.train=s3://bucket/train"],
        "cannot reach http://127.0.0.1:9",
        env=(
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ),
    ),
    Case(
        "evaluate",
        "an IJB face list that is not text",
        evaluate_ijb(lambda ws: str(non_utf8_ijb(ws))),
        "expected UTF-8 text",
    ),
    Case(
        "prepare_dataset",
        "an identity folder name that is not UTF-8",
        lambda ws: ["--input", face_folder(ws), "--out", str(ws.out / "ds")],
        "the name is not UTF-8 text",
    ),
    Case(
        "prepare_dataset",
        "random bytes as RecordIO",
        lambda ws: ["--recordio", random_recordio(ws), "--out", str(ws.out / "ds")],
        "bad record magic",
    ),
    Case(
        "prepare_dataset",
        "--out under an existing file",
        lambda ws: [
            "--input",
            face_folder(ws, b"cafe"),
            "--out",
            str(ws.sentinel / "notes.txt" / "ds"),
        ],
        "a file is in the way",
    ),
    Case(
        "prepare_dataset",
        "--jpeg-quality out of range",
        lambda ws: [
            "--input",
            face_folder(ws, b"cafe"),
            "--out",
            str(ws.out / "ds"),
            "--jpeg-quality",
            "300",
        ],
        "--jpeg-quality: expected in [1, 100], found 300",
        made_nothing="out/ds",
    ),
    Case(
        "prepare_dataset",
        "pairs asked of too few identities (refused before the import)",
        lambda ws: [
            "--input",
            face_folder(ws, b"cafe"),
            "--out",
            str(ws.out / "ds"),
            "--pairs-per-fold",
            "10",
        ],
        "verification pairs need at least 20 identities with 2+ images",
        made_nothing="out/ds",
    ),
    Case(
        "distill",
        "a dataset.json that lists no shards",
        lambda ws: ["--set", f"data.train={shardless_dataset(ws)}"],
        "expected at least one shard with images",
    ),
    Case(
        "synthesize",
        "synthetic.out under an existing file",
        lambda ws: ["--set", f"synthetic.out={ws.sentinel / 'notes.txt'}"],
        "a file is in the way",
    ),
    Case(
        "train_teacher",
        "a missing dataset",
        lambda ws: [
            "--set",
            f"data.train={ws.root / 'nothing'}",
            "--set",
            f"storage_path={ws.out}",
        ],
        "dataset.json not found",
    ),
    Case(
        "retrain",
        "a torn champion.json in the registry",
        damaged_registry,
        "champion.json: not valid JSON",
    ),
    Case(
        "export",
        "a directory as --student",
        lambda ws: ["--student", str(ws.sentinel), "--out", str(ws.out / "export")],
        "is a directory, expected a file",
    ),
    Case(
        "import_teacher",
        "a directory as --backbone",
        lambda ws: ["--backbone", str(ws.sentinel), "--out", str(ws.out / "teacher")],
        "is a directory, expected a file",
    ),
    Case(
        "evaluate",
        "pairs that are all same-identity",
        lambda ws: [
            "--no-teacher",
            "--student",
            f"a={student_file(ws)}",
            "--set",
            f"data.eval={positive_pairs_only(ws)}",
        ],
        "same-identity and 0 different-identity pairs; verification needs both",
    ),
    Case(
        "evaluate",
        "an IJB image that is missing",
        evaluate_ijb(lambda ws: ijb_tree(ws, remove_one_image)),
        "have no image, e.g. ['2.jpg']",
    ),
    Case(
        "evaluate",
        "a NaN landmark in IJB",
        evaluate_ijb(lambda ws: ijb_tree(ws, nan_landmark)),
        "NaN or infinite landmark",
    ),
    Case(
        "tune",
        "a missing dataset",
        lambda ws: ["--set", f"data.train={ws.root / 'nothing'}"],
        "dataset.json not found",
    ),
    Case(
        "compare",
        "a missing dataset",
        lambda ws: ["--set", f"data.train={ws.root / 'nothing'}"],
        "dataset.json not found",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.job}: {c.what}")
def test_a_hostile_input_is_one_error_line_and_touches_nothing(
    case: Case,
    tmp_path: Path,
    tiny_synthetic: SyntheticDatasets,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in case.env:
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    fresh_s3_clients()
    monkeypatch.setattr(cli, "use_endpoint", lambda *_: None)  # keep this row's environment
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "v.bin").write_bytes(b"keep me")
    (sentinel / "random.bin").write_bytes(bytes(range(256)) * 4)
    (sentinel / "notes.txt").write_text("keep me too")
    ws = Workspace(tmp_path, sentinel, tiny_synthetic)
    argv = case.argv(ws)
    inputs = Path(tiny_synthetic.train_uri).parent
    before = tree_hash(sentinel, inputs)
    capsys.readouterr()
    code = cli.run(MAINS[case.job], argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert case.expect in lines[0], lines[0]
    assert tree_hash(sentinel, inputs) == before, "something outside the job's output changed"
    if case.made_nothing:
        assert not (tmp_path / case.made_nothing).exists(), "refused only after it started work"


def fresh_s3_clients() -> None:
    """s3fs keeps one client per set of arguments; a row's credentials and endpoint come
    from its environment, so no client made before it may be reused."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def corrupt_copy(data: SyntheticDatasets, out: Path, victim: int = 5) -> str:
    """The training set rewritten with image ``victim`` cut to 300 bytes."""
    writer = fmt.DatasetWriter(
        str(out), data.train.image_size, shard_bytes=2**20, source={"kind": "test"}
    )
    for table in fmt.iter_shards(data.train_uri, data.train):
        for i, row in enumerate(table.to_pylist()):
            image = row["image"][:300] if i == victim else row["image"]
            writer.add(image, row["label"], row["identity"], row["image_id"])
    writer.publish(fmt.read_identities(data.train_uri, data.train))
    return str(out)


@pytest.mark.e2e
def test_an_input_error_inside_ray_actors_is_one_line_naming_its_log(
    tmp_path: Path, train_setup: TrainSetup
) -> None:
    """The real CLI, its own Ray cluster, its workers' output streamed to the console: a
    corrupt JPEG met by a Ray Data actor of ``build_classifier mean-embedding`` is one
    ``error:`` line naming the image and a log file that holds the remote traceback; no
    worker traceback or worker log line before it, and no output directory left behind."""
    dataset = corrupt_copy(train_setup_data(train_setup), tmp_path / "corrupt")
    out = tmp_path / "classifier"
    logs = tmp_path / "logs"
    env = {**clean_env(), cli.ERROR_LOG_DIR_ENV: str(logs)}
    teacher = train_setup.base.teacher
    done = subprocess.run(
        [
            sys.executable, "-m", "jobs.build_classifier", "mean-embedding",
            "--dataset", dataset, "--out", str(out), "--teacher", teacher.backbone,
            "--set", f"teacher.emb_dim={teacher.emb_dim}",
            "--set", f"student.emb_dim={teacher.emb_dim}",
            "--set", f"data.image_size={train_setup.base.data.image_size}",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # The driver's own core worker prints Ray 2.60's notice about actor arguments in the
    # object store straight to its stderr (C++, not a stream Python can filter; README,
    # "Console output"): the one line allowed besides ours.
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and not any(p.search(line) for p in runs.QUIET_WORKER_LINES)
    ]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "pid=" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "cannot decode JPEG (300 bytes)" in lines[0]
    (log,) = logs.iterdir()
    assert lines[0].endswith(f"(traceback: {log})")
    assert "Traceback (most recent call last)" in log.read_text()
    assert "CorruptImageError" in log.read_text()
    assert not out.exists(), "a failed first build leaves no output directory"


def train_setup_data(setup: TrainSetup) -> SyntheticDatasets:
    """The dataset ``setup`` was made for, from its config."""
    train, evaluation = setup.base.data.train, setup.base.data.eval
    return SyntheticDatasets(fmt.read_meta(train), fmt.read_meta(evaluation), train, evaluation)


def test_an_input_error_is_found_in_the_text_ray_carries() -> None:
    """A Ray Data task's failure reaches the driver with the original exception only as
    text: the first input error named on a line of its own is re-created, by type."""
    from orchestrator.data.images import CorruptImageError
    from orchestrator.errors import user_error_in_text

    text = (
        "Traceback (most recent call last):\n  File 'x.py', line 1\n"
        "orchestrator.data.images.CorruptImageError: ds, image_id a/1: cannot decode JPEG\n"
        "\nThe above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "FileNotFoundError: a later one\n"
    )
    found = user_error_in_text(text)
    assert type(found) is CorruptImageError
    assert str(found) == "ds, image_id a/1: cannot decode JPEG"
    assert user_error_in_text("ValueError: not ours\nCorruptImageError: unqualified\n") is None


def test_ray_records_that_repeat_a_failure_are_dropped_and_others_kept() -> None:
    """The filters ray_hook installs drop exactly the listed messages of the listed
    loggers: another record of the same logger still gets through."""
    import logging

    from orchestrator import ray_hook

    ray_hook.quiet_ray_records()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    for name, fragments in ray_hook.QUIET_RECORDS.items():
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            logger.error(f"{fragments[0]}: and the rest of the message")
            logger.error("something else entirely")
        finally:
            logger.removeHandler(handler)
    assert seen == ["something else entirely"] * len(ray_hook.QUIET_RECORDS)
