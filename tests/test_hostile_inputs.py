"""Hostile and broken inputs, table-driven: every row runs one job's real CLI (in-process,
``cli.run``) against a crafted or broken input and asserts exit 2, exactly one ``error:``
line and no traceback, and that nothing outside the job's own output changed (a hash of a
sentinel directory and of the inputs, before and after). A new job or input class joins
by adding a row to ``CASES``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import build_classifier, compare, demo, distill, evaluate, tune
from orchestrator import classifier as clf
from orchestrator import cli
from orchestrator.data import format as fmt
from orchestrator.data.prepare import SyntheticDatasets


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


MAINS = {
    "demo": demo.main,
    "build_classifier": build_classifier.main,
    "evaluate": evaluate.main,
    "distill": distill.main,
    "compare": compare.main,
    "tune": tune.main,
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
        lambda ws: [
            "--student",
            f"a={student_file(ws)}",
            "--no-eval",
            "--ijb",
            str(non_utf8_ijb(ws)),
        ],
        "expected UTF-8 text",
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


def fresh_s3_clients() -> None:
    """s3fs keeps one client per set of arguments; a row's credentials and endpoint come
    from its environment, so no client made before it may be reused."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
