"""The single-process side of ``samtune.finetune.distributed``: batch-aligned shards, the data
order of each rank, and accumulators merged in rank order equal to one accumulator."""

from __future__ import annotations

import numpy as np
import pytest

from samtune.finetune import distributed
from samtune.finetune.distributed import Ranks
from samtune.finetune.scoring.metrics import ClassIoUAccumulator
from samtune.finetune.train.resume import DataOrder
from samtune.finetune.scoring.volume_metrics import SemanticVolumeAccumulator, VolumeMetricAccumulator


def test_one_process_is_everything_and_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == (Ranks(), None)
    assert distributed.current() == Ranks() and Ranks().main
    assert distributed.shard(10, 3) == range(10)
    assert distributed.gather("x") == ["x"]


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 3, 2), (7, 2, 3), (2, 4, 2), (16, 4, 4)])
def test_shards_are_whole_batches_that_cover_the_split_once_in_order(monkeypatch, n, batch, world):
    parts = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "current", lambda rank=rank: Ranks(rank, world))
        parts.append(distributed.shard(n, batch))
    assert [i for p in parts for i in p] == list(range(n))
    assert all(p.start % batch == 0 for p in parts if len(p))


def test_each_rank_takes_its_batches_of_the_single_process_order():
    batch, world, total = 2, 3, 36
    single = DataOrder(50, total, seed=4).order
    ranks = [DataOrder(50, total, seed=4, batch_size=batch, rank=r, world=world).order for r in range(world)]
    steps = total // (batch * world)
    for s in range(steps):  # step s of all ranks = the single process's global batch s
        together = [i for r in range(world) for i in ranks[r][s * batch : (s + 1) * batch]]
        assert together == single[s * batch * world : (s + 1) * batch * world]
    # a resumed rank starts where it stopped: `start` counts samples of all ranks
    resumed = DataOrder(50, total, seed=4, start=2 * batch * world, batch_size=batch, rank=1, world=world).order
    assert resumed == ranks[1][2 * batch :]


class _Source:
    """Two cases of 4 slices, 6×6."""

    volumetric = True

    def __len__(self):
        return 8

    def slice_position(self, index):
        return (f"case{index // 4}", index % 4)

    def case_volume(self, case):
        rng = np.random.default_rng(int(case[-1]))
        return (rng.integers(0, 3, (4, 6, 6)).astype(np.uint8), (2.0, 1.0, 1.0))


def test_accumulators_merged_in_rank_order_equal_one_accumulator():
    rng = np.random.default_rng(0)
    samples = [(f"c{rng.integers(3)}", rng.random((8, 8)) > 0.5, rng.random((8, 8)) > 0.5) for _ in range(9)]
    whole, first, second = ClassIoUAccumulator(), ClassIoUAccumulator(), ClassIoUAccumulator()
    for i, s in enumerate(samples):
        whole.add(*s)
        (first if i < 5 else second).add(*s)
    first.merge(second)
    assert first.result() == whole.result()

    source = _Source()
    slices = [(i, rng.integers(0, 3, (6, 6)).astype(np.uint8)) for i in range(8)]
    whole_s, a, b = (SemanticVolumeAccumulator(source, {1: "one", 2: "two"}) for _ in range(3))
    whole_p, pa, pb = (VolumeMetricAccumulator(source, {1: "one", 2: "two"}) for _ in range(3))
    for index, label in slices:  # slices 0..2 on one rank, 3..7 (both cases) on the other
        whole_s.add_label(index, label)
        (a if index < 3 else b).add_label(index, label)
        whole_p.add(index, 1, label == 1)
        (pa if index < 3 else pb).add(index, 1, label == 1)
    import pickle

    a.merge(pickle.loads(pickle.dumps(b)))  # what all_gather_object sends: no source inside
    pa.merge(pickle.loads(pickle.dumps(pb)))
    assert a.result() == whole_s.result()
    assert pa.result() == whole_p.result()
    assert "source" not in pickle.loads(pickle.dumps(b)).__dict__
