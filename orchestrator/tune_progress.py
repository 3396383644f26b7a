"""Our progress lines for Tune runs (searches and comparisons), in place of Tune's status
tables: one line when a trial starts, one per reported epoch, one when it ends. Imported
only when a Tune run starts (it imports Ray Tune)."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from orchestrator.tune_summary import REFUSED_BY


class TrialProgress(Callback):
    """Prints ``[what] trial <id> ...`` lines on the driver (Tune calls its callbacks
    there). ``metric`` is the reported key shown with each epoch; ``epochs`` the epochs a
    trial trains. Tune saves it with the run's state, so a resumed run prints the same."""

    def __init__(self, what: str, *, metric: str, epochs: int) -> None:
        self.what, self.metric, self.epochs = what, metric, epochs
        self.ended: set[str] = set()

    def line(self, trial: Any, text: str) -> None:
        print(f"[{self.what}] trial {trial.trial_id} {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={v}" for k, v in sorted((trial.config or {}).items()))
        self.line(trial, f"started ({params})")

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "epoch" not in result:
            return
        if result.get(REFUSED_BY):  # a search's constraint, judged before training
            self.line(trial, f"refused, never trained: {result[REFUSED_BY]}")
            return
        value = result.get(self.metric)
        shown = f"  {self.metric} {value:.4f}" if isinstance(value, int | float) else ""
        self.line(trial, f"epoch {int(result['epoch']) + 1}/{self.epochs} done{shown}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)
        self.line(trial, f"finished ({len(self.ended)}/{len(trials)} trials ended)")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)
        self.line(trial, f"failed ({len(self.ended)}/{len(trials)} trials ended)")
