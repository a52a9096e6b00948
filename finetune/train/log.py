"""What a training run tells while it runs: TensorBoard scalars and pictures, a progress bar on a
terminal or a log line every ``train.log_every`` steps in a log file, one line per evaluation and
the below-baseline warning. ``TrainLog`` on the process that writes (rank 0), ``SilentLog`` on the
others, so the loop never asks which rank it is."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from samtune.finetune.runtime import autocast
from samtune.finetune.train.step import StepResult

log = logging.getLogger(__name__)


class SilentLog:
    """Processes other than rank 0: nothing is shown or written (warnings still reach the log)."""

    def start(self, first_step: int, steps: int, resumed: bool) -> None:
        pass

    def step(self, step: int, path: str, result: StepResult, optimizer, scheduler) -> None:
        pass

    def pictures(self, run, step: int) -> None:
        pass

    def evaluation(self, step: int, metrics: dict, state, decision) -> None:
        pass

    def close(self) -> None:
        pass


class TrainLog(SilentLog):
    """Rank 0's view of the run, in ``<output.dir>/tensorboard`` and on stderr."""

    def __init__(self, out: Path, recipe, device: torch.device):
        self.out, self.recipe, self.device = Path(out), recipe, device
        self.interactive = sys.stderr.isatty()  # a log file gets a line every log_every steps, not redrawn bars
        self.writer = self.progress = None

    def start(self, first_step: int, steps: int, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events it logged after its state was written
        self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=first_step if resumed else None)
        self.progress = tqdm(total=steps, initial=first_step - 1, desc="train", unit="step", disable=not self.interactive)
        self.steps, self.started = steps, time.perf_counter()
        self.masks, self.window_start = 0, time.perf_counter()  # masks trained since the last log line, for masks/s

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def step(self, step: int, path: str, result: StepResult, optimizer, scheduler) -> None:
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{result.loss:.4f}", path=path)
        self.masks += result.masks
        if not (step % self.recipe.train.log_every == 0 or step == 1):
            return
        w = self.writer
        w.add_scalar(f"train/loss_{path}", result.loss, step)
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            w.add_scalar(f"train/lr_{group['name']}", lr, step)
        if result.grad_norm is not None:
            w.add_scalar("train/grad_norm", result.grad_norm, step)
        now = time.perf_counter()
        w.add_scalar("train/masks_per_s", self.masks / max(now - self.window_start, 1e-9), step)
        self.masks, self.window_start = 0, now
        w.add_scalar("train/peak_memory_gb", peak_memory_gb(self.device), step)
        if not self.interactive:
            log.info("%s", progress_line(step, self.steps, result.loss, path, scheduler.get_last_lr()[0], self.elapsed_s))

    def pictures(self, run, step: int) -> None:
        """Prediction overlays of fixed validation samples every ``train.image_every`` steps
        (default: at each evaluation) and at the last step."""
        every = self.recipe.train.eval_every if self.recipe.train.image_every is None else self.recipe.train.image_every
        if every and (step % every == 0 or step == self.steps):
            from samtune.finetune.report.overlays import log_pictures

            with autocast(self.device, self.recipe.train.precision):
                log_pictures(self.writer, run.model, run.family, run.data, self.recipe, self.device, step)

    def evaluation(self, step: int, metrics: dict, state, decision) -> None:
        for part in ("prompted", "semantic"):
            if part in metrics:
                self.writer.add_scalar(f"val_{part}/miou", metrics[part]["miou"], step)
                self.writer.add_scalar(f"val_{part}/mdice", metrics[part]["mdice"], step)
                for name, c in metrics[part]["per_class"].items():
                    self.writer.add_scalar(f"val_{part}_iou/{name}", c["iou"], step)
        if decision.below_baseline:
            log.warning("step %d: validation %s mIoU %.4f is BELOW the model before fine-tuning (%.4f)", step, metrics["headline"], metrics["miou"], state.baseline["miou"])
        best = state.best
        self.progress.write(f"step {step}: val {metrics['headline']} mIoU {metrics['miou']:.4f} (best {best['miou']:.4f} @ {best['step']})")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def progress_line(step: int, steps: int, loss: float, path: str, lr: float, elapsed: float) -> str:
    """The progress of a run as one log line (when stderr is not a terminal)."""
    rate = step / elapsed if elapsed > 0 else 0.0
    eta = (steps - step) / rate if rate else 0.0
    return f"step {step}/{steps}  loss {loss:.4f} ({path})  lr {lr:.2e}  {rate:.2f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated by torch on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
