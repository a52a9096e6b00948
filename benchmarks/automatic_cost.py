"""What training the automatic mode costs: ``samtune train RECIPE task=both`` vs ``task=promptable``.

Both runs are the trainer users run (``samtune.finetune.train.loop.train`` on the recipe with
``task=...``, ``train.steps=--steps``, ``train.eval_every=--steps``: the baseline evaluation and
one at the end), in one process with the same torch threads, interleaved: each repetition runs
both tasks, in an order rotated by one each repetition, so drift in the machine's load hits both
alike. Timed per run:

- steps: the sum over training steps of ``optimizer_step``'s wall time (data loading of the step
  included, evaluations and checkpoints excluded), split by path for ``both`` (automatic steps
  decode all K class prompts of every image: K = 19 on Cityscapes; prompted steps as in the
  promptable run; ``automatic.ratio`` of the steps are automatic);
- run: the whole ``train`` call (model and data built, two evaluations, checkpoints, report).

The table gives the median of the repetitions. ``both_vs_prompted_wall`` is the ratio of the
steps' seconds (the goal of issue 20: ≤ 1.5, the automatic mode at about prompt-only cost).
Last line: ``RESULT both_vs_prompted_wall=<both steps s ÷ promptable steps s>
prompted_s=<promptable steps s> both_s=<both steps s>``.

The recipe's data (the Cityscapes demo: synthetic scenes, generated on first use) goes to
``--data-root`` (default: the recipe's ``data.root``); runs are written to a temporary folder.
On a shared CPU pass ``--threads 1`` (the default): two threads on two busy cores wait for each
other.

    .venv/bin/python benchmarks/automatic_cost.py                                  # cityscapes_demo, 60 steps, 1 thread
    .venv/bin/python benchmarks/automatic_cost.py --steps 100 --repeats 2
    .venv/bin/python benchmarks/automatic_cost.py --recipe recipes/demo.yaml --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("promptable", "both")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform says."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def load_text() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/driving/cityscapes_demo.yaml", help="recipe YAML (default: the Cityscapes demo)")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each run (default 60)")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions of the pair of runs (default 1); the table gives medians")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: a shared CPU)")
    parser.add_argument("--data-root", help="data.root override (default: the recipe's)")
    parser.add_argument("--out", help="folder for the runs (default: a temporary folder, removed)")
    parser.add_argument("overrides", nargs="*", default=[], help="more recipe overrides key.path=value for both runs")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --repeats and --threads must be at least 1")
    return args


def timed_train(recipe, step_seconds: dict) -> float:
    """``train(recipe)`` with each ``optimizer_step``'s wall added to ``step_seconds[path]``;
    returns the call's wall seconds. Tables and log lines are swallowed."""
    import samtune.finetune.train.loop as loop

    inner = loop.optimizer_step

    def timed(opt, next_batch, path, *rest, **kwargs):
        started = time.perf_counter()
        try:
            return inner(opt, next_batch, path, *rest, **kwargs)
        finally:
            step_seconds[path] = step_seconds.get(path, 0.0) + time.perf_counter() - started

    loop.optimizer_step = timed
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = loop.train(recipe)
    finally:
        loop.optimizer_step = inner
    step_seconds["miou"] = result["miou"]
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from samtune.finetune.recipe import load_recipe

    torch.set_num_threads(args.threads)
    logging.getLogger("samtune").setLevel(logging.WARNING)
    print(f"CPU: {cpu_name()}; {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_text()}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="automatic_cost_"))
    rows: dict[str, list[dict]] = {task: [] for task in TASKS}
    for repeat in range(args.repeats):
        order = TASKS[repeat % 2 :] + TASKS[: repeat % 2]
        for task in order:
            overrides = [f"task={task}", f"train.steps={args.steps}", f"train.eval_every={args.steps}",
                         f"output.dir={out / f'{task}_{repeat}'}", *args.overrides]  # fmt: skip
            if args.data_root:
                overrides.append(f"data.root={args.data_root}")
            seconds: dict = {}
            wall = timed_train(load_recipe(args.recipe, overrides), seconds)
            seconds["run"] = wall
            rows[task].append(seconds)
            print(f"  repeat {repeat + 1}/{args.repeats} {task:10s} steps {sum(seconds.get(p, 0.0) for p in ('prompted', 'automatic')):7.1f} s"
                  f"  run {wall:7.1f} s  load {load_text()}", flush=True)  # fmt: skip
    if not args.out:
        import shutil

        shutil.rmtree(out, ignore_errors=True)

    def median(task: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows[task])

    steps = {task: statistics.median(r.get("prompted", 0.0) + r.get("automatic", 0.0) for r in rows[task]) for task in TASKS}
    print(f"\n{args.recipe}, {args.steps} steps, {args.repeats} repetition(s), {torch.get_num_threads()} thread(s); medians; load average {load_text()}")
    print(f"{'task':12s} | {'steps s':>8s} | {'s/step':>7s} | {'automatic steps s':>17s} | {'prompted steps s':>16s} | {'run s':>7s} | {'mIoU':>6s}")
    print("-" * 92)
    for task in TASKS:
        print(f"{task:12s} | {steps[task]:8.1f} | {steps[task] / args.steps:7.3f} | {median(task, 'automatic'):17.1f} | "
              f"{median(task, 'prompted'):16.1f} | {median(task, 'run'):7.1f} | {median(task, 'miou'):6.3f}")  # fmt: skip
    ratio = steps["both"] / steps["promptable"]
    print(f"both / promptable, training steps: {ratio:.2f} (goal ≤ 1.5: {'pass' if ratio <= 1.5 else 'FAIL'});"
          f" whole runs: {median('both', 'run') / median('promptable', 'run'):.2f}")  # fmt: skip
    print(f"RESULT both_vs_prompted_wall={ratio:.2f} prompted_s={steps['promptable']:.1f} both_s={steps['both']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
