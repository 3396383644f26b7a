"""The ``tracking:`` section: where runs, searches, comparisons and the retrain registry
are mirrored in MLflow (README "Tracking runs in MLflow")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.typed_yaml import require

# The tracking URI schemes MLflow's client takes that we can check without reaching them.
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "databricks")
URI_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking.

    ``uri`` empty: ``$MLFLOW_TRACKING_URI`` when set, else an SQLite database ``mlflow.db``
    beside the runs when ``storage_path`` is
    local (nothing to start), and no tracking at all when it is on object storage (one line
    says so: a database cannot live in a bucket). On a cluster, point ``uri`` at a tracking
    server (``http://mlflow.internal:5000``). ``experiment`` empty: the config's ``name``.
    The tracker is never allowed to fail a run: each call gets ``retries`` tries of at most
    ``timeout_s`` seconds, then one warning line, and training goes on.
    """

    enabled: bool = True
    uri: str = ""
    experiment: str = ""
    # Also upload student.pt (and the best epoch's) as artifacts; the checkpoints always
    # stay in storage_path only.
    log_student: bool = False
    registered_model: str = ""  # jobs.retrain/jobs.export: empty -> the config's name
    timeout_s: float = 5.0
    retries: int = 2

    def __post_init__(self) -> None:
        found = URI_SCHEME.match(self.uri)
        require(
            not self.uri
            or (found is not None and found.group(1).split("+")[0] in TRACKING_SCHEMES),
            "uri",
            f"expected an MLflow tracking URI ({', '.join(s + '://' for s in TRACKING_SCHEMES)}), "
            f"found {redact_uri(self.uri)!r}",
        )
        require(self.timeout_s > 0, "timeout_s", f"must be > 0, found {self.timeout_s}")
        require(1 <= self.retries <= 10, "retries", f"must be in 1..10, found {self.retries}")


def redact_uri(uri: str) -> str:
    """``uri`` with any password (``user:secret@host``) and token query value hidden: what
    may be printed."""
    hidden = re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", uri)
    return re.sub(r"((?:token|password|secret|key)=)[^&]*", r"\1***", hidden, flags=re.I)
