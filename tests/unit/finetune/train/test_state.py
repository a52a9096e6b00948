"""The loop's state: ``record_eval`` decides best / below baseline / early stop from a list of
scores; ``state_dict`` writes, and ``load_state_dict`` reads, the ``loop`` entry of the training
states written before this module existed (a state folder of that code in tests/integration/data);
the loop's random generators restore to the same draws."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from samtune.finetune.train.state import LoopRandom, LoopState

OLD_STATE = Path(__file__).resolve().parents[3] / "integration" / "data" / "state_d7f6b21" / "step_000003"


def scores(values: list[float]) -> list[dict]:
    return [{"headline": "semantic", "miou": v, "mdice": v, "semantic": {"miou": v}} for v in values]


def replay(baseline: float, values: list[float], patience: int | None, last_step: int = 100) -> tuple[LoopState, list]:
    state = LoopState.from_baseline(scores([baseline])[0])
    decisions = [state.record_eval(10 * (i + 1), m, loss=0.5, patience=patience, last_step=last_step) for i, m in enumerate(scores(values))]
    return state, decisions


def test_best_below_baseline_and_patience_from_a_list_of_numbers():
    state, decisions = replay(0.5, [0.6, 0.4, 0.45, 0.7, 0.65, 0.66, 0.2], patience=3)
    assert [d.best for d in decisions] == [True, False, False, True, False, False, False]
    assert [d.below_baseline for d in decisions] == [False, True, True, False, False, False, True]
    assert [d.stop for d in decisions] == [False, False, False, False, False, False, True]  # 3 evaluations without a new best
    assert state.best == {"miou": 0.7, "step": 40} and state.below_baseline == [20, 30, 70]
    assert state.stopped_early == {"step": 70, "patience": 3, "best_step": 40}
    assert [h["step"] for h in state.history] == [10, 20, 30, 40, 50, 60, 70]
    assert state.history[1] == {"step": 20, "miou": 0.4, "mdice": 0.4, "loss": 0.5, "semantic_miou": 0.4, "below_baseline": True}
    assert state.metrics["miou"] == 0.2


def test_no_patience_never_stops_and_the_last_step_never_counts_as_early():
    _, decisions = replay(0.5, [0.1] * 6, patience=None)
    assert not any(d.stop for d in decisions)
    _, decisions = replay(0.5, [0.6, 0.1], patience=1, last_step=20)
    assert [d.stop for d in decisions] == [False, False]  # step 20 is the end anyway


def test_a_state_of_the_earlier_code_loads_and_writes_back_the_same():
    saved = json.loads((OLD_STATE / "state.json").read_text())
    state = LoopState()
    state.load_state_dict(saved["loop"], saved["step"])
    assert state.step == 3 and state.resumed and state.served == {"prompted": 2, "automatic": 1} and state.draws == 4
    assert state.best["step"] == 3 and [h["step"] for h in state.history] == [3]
    assert state.baseline["headline"] == "semantic" and state.metrics["miou"] == state.history[-1]["miou"]
    assert json.loads(json.dumps(state.state_dict(), allow_nan=True)) == saved["loop"]


def test_a_new_state_starts_below_every_score():
    state = LoopState.from_baseline(scores([0.0])[0])
    assert state.best["miou"] == -math.inf and state.metrics is state.baseline and state.step == 0


def test_random_generators_restore_to_the_same_draws():
    random = LoopRandom(seed=3)
    random.choose_path(0.5, True, True)
    saved = random.state_dict()
    first = ([random.choose_path(0.5, True, True) for _ in range(20)], [random.choose_box(0.5) for _ in range(20)],
             torch.randint(0, 1000, (5,), generator=random.clicks), np.random.random(), torch.rand(2))  # fmt: skip
    other = LoopRandom(seed=99)
    other.load_state_dict(*saved)
    again = ([other.choose_path(0.5, True, True) for _ in range(20)], [other.choose_box(0.5) for _ in range(20)],
             torch.randint(0, 1000, (5,), generator=other.clicks), np.random.random(), torch.rand(2))  # fmt: skip
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and first[3] == again[3] and torch.equal(first[4], again[4])
    assert set(first[0]) == {"automatic", "prompted"}


def test_one_path_alone_draws_nothing():
    random = LoopRandom(seed=0)
    before = random.task.bit_generator.state
    assert random.choose_path(0.5, prompted=False, automatic=True) == "automatic"
    assert random.choose_path(0.5, prompted=True, automatic=False) == "prompted"
    assert random.task.bit_generator.state == before
