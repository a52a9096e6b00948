"""The fine-tuning loop: recipe -> ``build_run`` (model, data, optimisation; ``train.run``) ->
``start_state`` (the baseline evaluation, or the state a resumed run continues) -> ``fit`` (steps,
evaluations, checkpoints, training states) -> ``finish`` (the result files).

Files of a run (``output.dir``): ``recipe.yaml`` (resolved), ``checkpoints/{last,best}/`` (peft
adapter folders), ``metrics.json`` (final model; ``baseline`` = before fine-tuning),
``per_case.csv`` (volumes), ``report.html``, ``tensorboard/``, ``states/`` (exact resume).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from samtune.adapters.registry import get_variant
from samtune.files import write_json_atomic
from samtune.finetune.model_card import render_model_card
from samtune.finetune.recipe import Recipe
from samtune.finetune.report.page import report_after_run
from samtune.finetune.scoring.protocol import evaluate_with_recipe
from samtune.finetune.scoring.tables import baseline_summary, json_ready, print_results, write_per_case
from samtune.finetune.distributed import gather, init_from_env, shutdown
from samtune.finetune.train.resume import load_state
from samtune.finetune.train.run import Run, build_run
from samtune.finetune.train.state import Decision, LoopState
from samtune.finetune.train.step import check_finite_weights, check_same_weights, optimizer_step

log = logging.getLogger(__name__)


def train(recipe: Recipe, resume: str | Path | None = None, resume_force: bool = False) -> dict:
    """Run one fine-tuning; returns the final metrics (also written to ``metrics.json``).
    ``resume``: "latest" (``<output.dir>/states``' newest) or a state or run folder: continue
    exactly where that state was written (``samtune.finetune.train.resume``). Launched by torchrun,
    each process runs this and they train as one (``samtune.finetune.distributed``)."""
    ranks, rank_device = init_from_env(recipe.train.device)
    try:
        run = build_run(recipe, ranks, rank_device, resume, resume_force)
        state = start_state(run)
        started = time.perf_counter()
        fit(run, state)
        return finish(run, state, time.perf_counter() - started)
    finally:
        if ranks.world > 1:
            shutdown()


def evaluate_run(run: Run, desc: str) -> dict:
    return evaluate_with_recipe(run.model, run.family, run.data, run.recipe, run.device, desc)


def start_state(run: Run) -> LoopState:
    """A new run: the model before fine-tuning is evaluated (LoRA's B starts at zero, so this is the
    base model; for the automatic path with untrained class prompts). A resumed run: weights,
    optimiser and scheduler, the loop's bookkeeping, the data order and every random state as the
    training state holds them. Opens the training batches either way."""
    if run.state_dir is None:
        baseline = evaluate_run(run, "eval (before)")
        log.info("before fine-tuning: %s mIoU %.4f", baseline["headline"], baseline["miou"])
        state = LoopState.from_baseline(baseline)
        run.open_batches(state.served)
        return state
    state = LoopState()
    step, loop, rng_json, rng_tensors = load_state(run.state_dir, run.model, run.opt.optimizer, run.opt.scheduler, run.ranks.rank, run.ranks.world)
    state.load_state_dict(loop, step)
    run.open_batches(state.served)  # random states after the loaders: opening one draws from torch's
    if run.data.train is not None:
        run.data.train.restore_draws(state.draws)
    run.random.load_state_dict(rng_json, rng_tensors)
    return state


def fit(run: Run, state: LoopState) -> LoopState:
    """Train from ``state.step + 1`` to ``train.steps``: each step draws its path (automatic or
    prompted; box or points), runs ``optimizer_step``; every ``train.eval_every`` steps and at the
    end an evaluation and checkpoints (``evaluate_and_save``, which may stop early); every
    ``train.save_every`` steps a training state to resume from."""
    t, r = run.recipe.train, run.random
    save_every = t.save_every or t.eval_every
    has_prompted, has_automatic = run.batches.prompted is not None, run.batches.automatic is not None
    run.model.train()
    run.log.start(state.step + 1, t.steps, state.resumed)
    for step in range(state.step + 1, t.steps + 1):
        path = r.choose_path(run.recipe.automatic.ratio, has_prompted, has_automatic)
        use_box = path == "prompted" and r.choose_box(run.recipe.prompts.box_probability)
        result = optimizer_step(run.opt, lambda: run.batches.next(path, state), path, use_box, r.clicks, step, state.last_good)  # noqa: B023
        state.step = step
        run.log.step(step, path, result, run.opt.optimizer, run.opt.scheduler)
        run.log.pictures(run, step)
        if (step % t.eval_every == 0 or step == t.steps) and evaluate_and_save(run, state, result.loss).stop:
            break
        if step % save_every == 0 and step < t.steps:
            save_training_state(run, state)
    run.log.close()
    return state


def evaluate_and_save(run: Run, state: LoopState, loss: float) -> Decision:
    """Evaluate at ``state.step`` (never with non-finite or diverged weights), record it, write
    ``checkpoints/last`` and, for a new best, ``checkpoints/best``."""
    step, t = state.step, run.recipe.train
    check_finite_weights(run.model, step, state.last_good)
    check_same_weights(run.model, run.ranks, step)
    metrics = evaluate_run(run, f"eval @ {step}")
    decision = state.record_eval(step, metrics, loss, t.early_stop_patience, t.steps)
    info = {"step": step, "headline": metrics["headline"], "miou": metrics["miou"], "mdice": metrics["mdice"]}
    guardrails = {"below_baseline_at": state.below_baseline, "stopped_early": state.stopped_early}
    card = render_model_card(run.recipe, get_variant(run.recipe.model.name), run.data, step, metrics, state.baseline, guardrails)
    run.files.save_checkpoint("last", run.model, info, card)
    state.last_good = f"the last good state is {run.files.checkpoint('last')} (step {step})"
    if decision.best:
        run.files.save_checkpoint("best", run.model, info, card)
    run.log.evaluation(step, metrics, state, decision)
    if decision.stop:
        best = state.best
        log.info("early stop at step %d: no better %s mIoU for %d evaluations (best %.4f @ %d)", step, metrics["headline"], t.early_stop_patience, best["miou"], best["step"])
    return decision


def save_training_state(run: Run, state: LoopState) -> None:
    """``states/step_NNNNNN``: weights, optimiser, scheduler, the loop state and every process's
    random states (gathered from all processes, written by rank 0)."""
    state.draws = run.data.train.draws if run.data.train is not None else 0
    rank_states = gather(run.random.state_dict())
    run.files.save_state(state.step, run.model, run.opt, state.state_dict(), rank_states, run.recipe.train.keep_states)


def finish(run: Run, state: LoopState, train_seconds: float) -> dict:
    """The run's result (returned on every process): the final metrics, the best checkpoint, the
    baseline, the history. Rank 0 writes ``metrics.json``, ``per_case.csv`` and ``report.html``
    and prints the before/after tables."""
    metrics, baseline, recipe = state.metrics, state.baseline, run.recipe
    result = json_ready(metrics)
    result.update(
        task=recipe.task,
        step=state.history[-1]["step"] if state.history else recipe.train.steps,
        checkpoint=str(run.files.checkpoint("last")),
        best={"step": state.best["step"], "miou": state.best["miou"], "checkpoint": str(run.files.checkpoint("best"))},
        baseline=baseline_summary(baseline),
        miou_gain=metrics["miou"] - baseline["miou"],
        below_baseline_at=state.below_baseline,
        stopped_early=state.stopped_early,
        history=state.history,
        parameters=run.params,
        train_seconds=round(train_seconds, 1),
        skipped_cases=run.data.skipped,
        device=str(run.device),
        processes=run.ranks.world,
    )
    if not run.files.write:
        return result
    write_json_atomic(run.out / "metrics.json", result)
    write_per_case(metrics, run.out)
    report_after_run(run.out, run.device)  # report.html: tables, charts, best and worst cases (a failure is only a warning)
    print_results({"before fine-tuning": baseline, f"after {result['step']} steps": metrics}, recipe)
    print(f"{metrics['headline']} mIoU {baseline['miou']:.3f} -> {metrics['miou']:.3f} ({metrics['miou'] - baseline['miou']:+.3f}); files in {run.out}")
    return result
