"""Nothing we load may run code: a student export, a teacher checkpoint or a training
checkpoint whose pickle would create a file is refused (exit 2 through the real CLI), and
the file is never created. Unreadable files are input errors too, named, without torch's
advice to load them unsafely."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.formats.best import BestRecord, load_best_state, read_best, write_best
from orchestrator.formats.loading import ArtifactError
from orchestrator.formats.state import TrainingState, load_state
from orchestrator.formats.student import read_student_export
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if the load runs code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def crafted(kind: str, marker: Path) -> bytes:
    """A file that looks like ours (the right ``kind``) with a code-running payload."""
    buffer = io.BytesIO()
    torch.save({"kind": kind, "version": 1, "payload": CreatesFile(marker)}, buffer)
    return buffer.getvalue()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def assert_refused(result: subprocess.CompletedProcess[str], path: Path, marker: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(path) in lines[0] and "Traceback" not in result.stderr
    assert "weights_only=False" not in result.stderr and "weights_only` set" not in result.stderr
    assert not marker.exists(), "the crafted pickle ran code"


def test_crafted_student_export_is_refused_by_evaluate_and_export(
    tmp_path: Path, tiny_synthetic: SyntheticDatasets
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "student.pt"
    evil.write_bytes(crafted("proxylesskd-student", marker))
    result = run(
        "jobs.evaluate",
        "--set",
        f"data.eval={tiny_synthetic.eval_uri}",
        "--no-teacher",
        "--student",
        f"evil={evil}",
    )
    assert_refused(result, evil, marker)
    assert "refusing to load it as a student export" in result.stderr
    assert "it asks for io.open" in result.stderr  # names what it asked for
    result = run("jobs.export", "--student", str(evil), "--out", str(tmp_path / "out"))
    assert_refused(result, evil, marker)
    assert not (tmp_path / "out").exists()


def test_crafted_teacher_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.pt"
    evil.write_bytes(crafted("proxylesskd-teacher", marker))
    result = run("jobs.evaluate", "--set", f"teacher.backbone={evil}")
    assert_refused(result, evil, marker)
    assert "refusing to load it as a teacher backbone: it asks for io.open" in result.stderr


@pytest.mark.unit  # pure: no subprocess, no Ray (module mark notwithstanding)
def test_crafted_training_state_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "state.pt").write_bytes(crafted("ignored", marker))
    with pytest.raises(ArtifactError, match=r"state\.pt: refusing to load it as a training"):
        load_state(str(tmp_path))
    assert not marker.exists()


def test_unreadable_files_are_input_errors_naming_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a pickle")
    with pytest.raises(ArtifactError, match=rf"{junk}: not a student export"):
        read_student_export(str(junk))
    result = run("jobs.export", "--student", str(junk), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and f"{junk}: not a student export" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("jobs.evaluate", "--set", f"teacher.backbone={junk}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"{junk}: neither a PyTorch file (checkpoint, TorchScript, insightface state dict) nor an ONNX graph"
        in result.stderr
    )
    # A torch file of the wrong kind: expected and found are both named.
    other = tmp_path / "other.pt"
    torch.save({"kind": "something-else"}, other)
    result = run("jobs.export", "--student", str(other), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "expected a proxylesskd-student file, found 'something-else'" in result.stderr


def _state(epoch: int) -> TrainingState:
    weight = torch.full((2, 2), float(epoch))
    return TrainingState(epoch, {"w": weight}, {}, {}, None, {})


@pytest.mark.unit  # pure: no subprocess, no Ray (module mark notwithstanding)
def test_best_record_replaces_its_state_publish_last(tmp_path: Path) -> None:
    """``<run>/best``: each improvement writes its own state file, then the record naming
    it, then removes the beaten one; the state read back is the recorded epoch's."""
    where = str(tmp_path / "best")
    assert read_best(where) is None
    first = BestRecord("auc", 0, 0.5)
    write_best(where, _state(0), first)
    assert BestRecord("auc", 0, 0.5).improved_by("auc", 0.6)
    assert not first.improved_by("auc", 0.5)  # a tie keeps the earlier epoch
    assert first.improved_by("rank1", 0.1)  # another metric: the old record says nothing
    write_best(where, _state(3), BestRecord("auc", 3, 0.7))
    record = read_best(where)
    assert record == BestRecord("auc", 3, 0.7)
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "best.json",
        "state_epoch0003.pt",
    ]
    state = load_best_state(where, record)
    assert state.epoch == 3 and torch.equal(state.student["w"], torch.full((2, 2), 3.0))


@pytest.mark.unit  # pure: no subprocess, no Ray (module mark notwithstanding)
def test_crafted_best_state_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    where = tmp_path / "best"
    write_best(str(where), _state(1), BestRecord("auc", 1, 0.5))
    (where / "state_epoch0001.pt").write_bytes(crafted("ignored", marker))
    with pytest.raises(ArtifactError, match=r"state_epoch0001\.pt: refusing to load it"):
        load_best_state(str(where), BestRecord("auc", 1, 0.5))
    assert not marker.exists()
