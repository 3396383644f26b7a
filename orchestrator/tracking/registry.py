"""The retraining registry mirrored in MLflow's model registry.

Our registry (``champion.json``, ``history.jsonl``, ``candidates/``, under its lock) stays
the source of truth; after every decision :func:`mirror_registry` makes MLflow agree with
it, whatever path led there (a promotion, a rejection, a skip, a crash completed): each
evaluated candidate is a version of the registered model (tagged with its snapshot's
fingerprint, its decision and its metrics), and the ``champion`` alias names the version
whose fingerprint ``champion.json`` holds, or nothing when it holds none."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator import storage
from orchestrator.config import ExperimentConfig
from orchestrator.tracking.client import Target, Tracker, target_of
from orchestrator.tracking.runs import tracked_run_id, upload

CHAMPION_ALIAS = "champion"
FINGERPRINT_TAG = "fingerprint"
STUDENT_ARTIFACT = "student"  # the candidate's student.pt, logged to its run when local
EXPORT_ARTIFACT = "export"  # jobs.export --register: the exported files, in the run


def mirror_registry(
    config: ExperimentConfig,
    *,
    candidates: Sequence[Mapping[str, Any]],
    decisions: Mapping[str, str],
    champion: Mapping[str, Any] | None,
) -> None:
    """Make the registered model agree with the registry: ``candidates`` (their records),
    ``decisions`` (fingerprint -> promoted | rejected) and ``champion`` (champion.json)."""
    target = target_of(config)
    if target is None:
        return
    tracker = Tracker(target)
    model = target.registered_model
    if tracker.call("registering the model", lambda c: ensure_model(c, model)) is None:
        return
    found = tracker.call("listing versions", lambda c: c.search_model_versions(f"name='{model}'"))
    if found is None:
        return
    versions = {v.tags.get(FINGERPRINT_TAG): str(v.version) for v in found}
    have = {v.tags.get(FINGERPRINT_TAG): dict(v.tags) for v in found}  # set only what differs
    # The champion too: it may predate tracking, or its candidate record may be gone.
    records = {str(c["fingerprint"]): c for c in (*candidates, *([champion] if champion else []))}
    for candidate in records.values():
        fingerprint = str(candidate["fingerprint"])
        if fingerprint not in versions:
            made = register(tracker, target, candidate)
            if made is None:
                continue
            versions[fingerprint] = made
        tags = {f"metric.{k}": str(v) for k, v in candidate.get("metrics", {}).items()}
        if fingerprint in decisions:
            tags["decision"] = decisions[fingerprint]
        version = versions[fingerprint]
        known = have.get(fingerprint, {})
        for key, value in {k: v for k, v in tags.items() if known.get(k) != v}.items():
            tracker.call(
                f"tagging version {version}",
                lambda c, n, k, v: c.set_model_version_tag(model, n, k, v),
                version,
                key,
                value,
            )
    point_champion(tracker, model, versions, champion)


def ensure_model(client: Any, model: str) -> bool:
    # mlflow: heavy, loaded only when a job tracks
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model)
    return True


def register(tracker: Tracker, target: Target, candidate: Mapping[str, Any]) -> str | None:
    """A new version for ``candidate``: its student where it lies on object storage, or
    logged to its training run first when it is a local file (the server refuses local
    paths as a version's source)."""
    student = str(candidate["student"])
    run_id = tracked_run_id(student.rsplit("/", 1)[0])
    source = student
    if storage.is_local(student):
        if run_id is None:
            print(
                f"warning: tracking: {student} has no MLflow run to hold it; not registered",
                flush=True,
            )
            return None
        upload(tracker, run_id, {f"{STUDENT_ARTIFACT}/student.pt": student}, {})
        source = f"runs:/{run_id}/{STUDENT_ARTIFACT}"
    tags = {FINGERPRINT_TAG: str(candidate["fingerprint"]), "snapshot": str(candidate["snapshot"])}
    made = tracker.call(
        "registering a version",
        lambda c: c.create_model_version(target.registered_model, source, run_id=run_id, tags=tags),
    )
    return None if made is None else str(made.version)


def point_champion(
    tracker: Tracker, model: str, versions: Mapping[str, str], champion: Mapping[str, Any] | None
) -> None:
    """The ``champion`` alias on the champion's version; removed when there is none."""
    version = None if champion is None else versions.get(str(champion["fingerprint"]))

    def point(client: Any) -> bool:
        current = client.get_registered_model(model).aliases.get(CHAMPION_ALIAS)
        if version is None and current is not None:
            client.delete_registered_model_alias(model, CHAMPION_ALIAS)
        elif version is not None and str(current) != version:
            client.set_registered_model_alias(model, CHAMPION_ALIAS, version)
        return True

    tracker.call("moving the champion alias", point)


def register_export(target: Target, *, student: str, out: str, files: Sequence[str]) -> str | None:
    """Register the export of ``student`` (``files`` under ``out``) as a new version of
    ``target.registered_model``: the files are logged to the student's training run (or to
    a run of their own when it has none) under ``export/``, and the version points there.
    Returns the version, or None when the backend could not be reached (one warning)."""
    tracker = Tracker(target)
    run_id = tracked_run_id(student.rsplit("/", 1)[0])
    if run_id is None:
        experiment = tracker.experiment_id()
        if experiment is None:
            return None
        made = tracker.call(
            "creating the export's run",
            lambda c: c.create_run(experiment, run_name="export", tags={"student": student}),
        )
        if made is None:
            return None
        run_id = str(made.info.run_id)
    upload(tracker, run_id, {f"{EXPORT_ARTIFACT}/{f}": storage.join(out, f) for f in files}, {})
    model = target.registered_model
    if tracker.call("registering the model", lambda c: ensure_model(c, model)) is None:
        return None
    tags = {"student": student, "export": out}
    made = tracker.call(
        "registering a version",
        lambda c: c.create_model_version(
            model, f"runs:/{run_id}/{EXPORT_ARTIFACT}", run_id=run_id, tags=tags
        ),
    )
    return None if made is None else str(made.version)
