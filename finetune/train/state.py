"""What the training loop carries from one step to the next, in two objects with
``state_dict()`` / ``load_state_dict()`` (the shape of Hugging Face's ``TrainerState``):

- ``LoopState``: the step, the evaluations so far (best, history, below-baseline steps, patience
  count, last metrics, the baseline), the data served (batches per path, the prompted dataset's
  jitter draws) and the last good checkpoint. ``record_eval`` decides best / below baseline /
  early stop.
- ``LoopRandom``: the loop's own generators (automatic-or-prompted, box-or-points, corrective
  clicks) and the global ones (Python, NumPy, torch CPU and CUDA).

``state_dict()`` writes the ``loop`` entry of ``states/step_NNNNNN/state.json`` exactly as the
training states written before this module existed, so those still resume (tested with a state
folder written by the earlier code, ``tests/integration/data/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from samtune.finetune.scoring.tables import json_ready
from samtune.finetune.train.resume import restore_rng_states, rng_states

NO_CHECKPOINT = "no checkpoint was written yet"


@dataclass(frozen=True)
class Decision:
    """What one evaluation means for the run: a new best (save ``best``), below the model before
    fine-tuning (warn), or patience exhausted (stop)."""

    best: bool
    below_baseline: bool
    stop: bool


@dataclass
class LoopState:
    step: int = 0  # the last step whose optimiser step is done
    baseline: dict = field(default_factory=dict)  # metrics of the model before fine-tuning
    metrics: dict = field(default_factory=dict)  # the latest evaluation (the baseline until the first)
    best: dict = field(default_factory=lambda: {"miou": -math.inf, "step": 0})
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    below_baseline: list[int] = field(default_factory=list)  # steps whose mIoU was below the baseline
    stale: int = 0  # evaluations since the last new best (train.early_stop_patience)
    last_good: str = NO_CHECKPOINT  # where to restart from, for error messages
    served: dict = field(default_factory=lambda: {"prompted": 0, "automatic": 0})  # batches per path
    draws: int = 0  # the prompted dataset's jitter counter (PromptedDataset.draws)
    stopped_early: dict | None = None
    resumed: bool = False  # loaded from a training state (not saved)

    @classmethod
    def from_baseline(cls, baseline: dict) -> LoopState:
        return cls(baseline=baseline, metrics=baseline)

    def record_eval(self, step: int, metrics: dict, loss: float, patience: int | None, last_step: int) -> Decision:
        """Add the evaluation at ``step`` (``loss``: that step's training loss) to the history and
        decide what it means. Changes this state only: no files, no logs, no model."""
        below = metrics["miou"] < self.baseline["miou"]  # users often learn this only after the fact
        best = metrics["miou"] > self.best["miou"]
        entry = {"step": step, "miou": metrics["miou"], "mdice": metrics["mdice"], "loss": loss}
        entry.update({f"{part}_miou": metrics[part]["miou"] for part in ("prompted", "semantic") if part in metrics})
        if below:
            entry["below_baseline"] = True
            self.below_baseline.append(step)
        self.history.append(entry)
        self.metrics = metrics
        if best:
            self.best, self.stale = {"miou": metrics["miou"], "step": step}, 0
        else:
            self.stale += 1
        stop = patience is not None and self.stale >= patience and step < last_step
        if stop:
            self.stopped_early = {"step": step, "patience": patience, "best_step": self.best["step"]}
        return Decision(best=best, below_baseline=below, stop=stop)

    def state_dict(self) -> dict:
        """The ``loop`` entry of a training state's ``state.json`` (``step`` is stored beside it)."""
        return {
            "best": self.best, "history": self.history, "below_baseline": self.below_baseline, "stale": self.stale,
            "last_good": self.last_good, "served": self.served, "draws": self.draws,
            "baseline": json_ready(self.baseline), "metrics": json_ready(self.metrics),
        }  # fmt: skip

    def load_state_dict(self, loop: dict, step: int) -> None:
        self.step, self.resumed = step, True
        self.best, self.history, self.below_baseline = loop["best"], loop["history"], loop["below_baseline"]
        self.stale, self.last_good, self.served, self.draws = loop["stale"], loop["last_good"], loop["served"], loop["draws"]
        self.baseline, self.metrics = loop["baseline"], loop["metrics"]


class LoopRandom:
    """The loop's random generators, seeded from the recipe's ``seed``: ``task`` draws automatic or
    prompted for each step, ``prompt`` box or points (the same on every process), ``clicks`` the
    corrective clicks (per process, on the model's device)."""

    def __init__(self, seed: int, rank: int = 0, device: torch.device | str = "cpu"):
        self.clicks = torch.Generator(device=device).manual_seed(seed + 1 + 1_000 * rank)
        self.prompt = np.random.default_rng(seed)
        self.task = np.random.default_rng([seed, 7])

    def choose_path(self, automatic_ratio: float, prompted: bool, automatic: bool) -> str:
        """"automatic" or "prompted" for the next step (a draw only when the run has both)."""
        auto = not prompted or (automatic and self.task.random() < automatic_ratio)
        return "automatic" if auto else "prompted"

    def choose_box(self, box_probability: float) -> bool:
        """Whether a prompted step starts from a box (else from points)."""
        return bool(self.prompt.random() < box_probability)

    def _generators(self) -> dict:
        return {"clicks": self.clicks, "prompt": self.prompt, "task": self.task}

    def state_dict(self) -> tuple[dict, dict]:
        """(JSON-able states, tensor states) of these generators and the global ones."""
        return rng_states(self._generators())

    def load_state_dict(self, as_json: dict, tensors: dict) -> None:
        restore_rng_states(as_json, tensors, self._generators())
