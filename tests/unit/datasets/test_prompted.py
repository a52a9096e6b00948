"""datasets/prompted.py: the prompted samples the trainer and evaluator consume (objects, seeding, tensors, boxes)."""

from __future__ import annotations

import numpy as np
import torch

from samtune.datasets import sample as S
from samtune.datasets.prompted import PromptedDataset
from samtune.adapters.preprocess import LongestSideTransform
from samtune.constants import PIXEL_MEAN, PIXEL_STD
from samtune.datasets.prompts import box_from_mask
from samtune.datasets.source import SliceSource
from samtune.finetune.recipe import PromptsSection


COLOUR = (200, 100, 50)
H, W, SIZE = 40, 80, 64  # a wide image: resized to 32×64, padded at the bottom


class MemorySource(SliceSource):
    """One 40×80 image: class 1 in the middle, class 2 touching the bottom-right corner, a tiny
    class-3 object and an ignored (255) patch."""

    class_names = {1: "left", 2: "corner", 3: "speck"}
    ignore_index = 255

    def __init__(self):
        self.image = np.empty((H, W, 3), np.uint8)
        self.image[:] = COLOUR
        self.label = np.zeros((H, W), np.uint8)
        self.label[10:20, 20:40] = 1
        self.label[30:40, 60:80] = 2
        self.label[2:4, 2:4] = 3  # 4 px
        self.label[0:2, 70:72] = 255

    def __len__(self):
        return 1

    def item_id(self, index):
        return f"img{index}"

    def load(self, index):
        return self.image.copy(), self.label.copy()

    def load_label(self, index):
        return self.label.copy()

    def slice_classes(self, index):
        ids, counts = np.unique(self.label, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))


def _dataset(training: bool, jitter: float = 5.0, seed: int = 0, **kw) -> PromptedDataset:
    kw.setdefault("min_pixels", 5)
    return PromptedDataset(
        MemorySource(), LongestSideTransform(SIZE), PromptsSection(box_jitter_px=jitter), training=training, seed=seed, **kw
    )


def test_objects_respect_min_pixels_and_classes():
    assert [p[:2] for p in _dataset(False).pairs] == [(0, 1), (0, 2)]  # the 4-px speck is below min_pixels=5
    assert [p[:2] for p in _dataset(False, min_pixels=4).pairs] == [(0, 1), (0, 2), (0, 3)]
    ds = _dataset(False, classes=["corner"])
    assert [p[:2] for p in ds.pairs] == [(0, 2)] and ds.class_names == {2: "corner"}
    assert len(_dataset(False)) == 2


def test_eval_samples_are_identical_across_accesses_and_instances():
    a, b = _dataset(False), _dataset(False)
    for k in range(len(a)):
        first, again, other = a[k], a[k], b[k]
        for key in (S.BOXES, S.IMAGE, S.MASKS):
            assert torch.equal(first[key], again[key]) and torch.equal(first[key], other[key]), key
    # the jitter is real (not zero) and depends on the seed
    s = a[0]
    tight = box_from_mask(s[S.MASKS][0].numpy().astype(bool))
    assert not np.array_equal(s[S.BOXES][0].numpy(), tight)
    assert not torch.equal(s[S.BOXES], _dataset(False, seed=1)[0][S.BOXES])


def test_training_samples_vary_between_accesses():
    ds = _dataset(True, classes=["left"])  # one object, so only the jitter can change the box
    boxes = [ds[0][S.BOXES] for _ in range(4)]
    assert all(not torch.equal(boxes[0], b) for b in boxes[1:])


def test_sample_contract_keys_shapes_dtypes():
    s = _dataset(False)[0]
    assert {S.IMAGE, S.MASKS, S.BOXES, S.META} <= set(s)
    assert s[S.IMAGE].shape == (3, SIZE, SIZE) and s[S.IMAGE].dtype == torch.float32
    assert s[S.MASKS].shape == (1, SIZE, SIZE) and s[S.MASKS].dtype == torch.float32
    assert s[S.BOXES].shape == (1, 4) and s[S.BOXES].dtype == torch.float32
    meta = s[S.META]
    assert meta["item"] == "img0" and meta["class_ids"] == [1] and meta["class_names"] == ["left"]
    assert meta["original_size"] == (H, W) and tuple(meta["resized_size"]) == (32, 64)
    assert len(meta["targets"]) == 1
    np.testing.assert_array_equal(meta["targets"][0], MemorySource().label == 1)  # original resolution
    np.testing.assert_array_equal(meta["ignore"], MemorySource().label == 255)
    train = _dataset(True, classes=["left"])[0]
    assert "targets" not in train[S.META]
    assert train[S.IMAGE].shape == (3, SIZE, SIZE) and train[S.MASKS].shape == (1, SIZE, SIZE)


def test_image_is_sam_normalised_and_zero_in_the_padding():
    image = _dataset(False)[0][S.IMAGE].numpy()
    expected = (np.array(COLOUR) - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)
    h, w = 32, 64
    np.testing.assert_allclose(image[:, :h, :w], np.broadcast_to(expected[:, None, None], (3, h, w)), atol=1e-5)
    assert (image[:, h:, :] == 0).all()
    # SAM's statistics, not ImageNet's 0-1 ones
    assert PIXEL_MEAN == (123.675, 116.28, 103.53) and PIXEL_STD == (58.395, 57.12, 57.375)


def test_mask_is_binary_resized_target_zero_in_padding():
    ds = _dataset(False, jitter=0.0)
    for k, rows, cols in ((0, (8, 16), (16, 32)), (1, (24, 32), (48, 64))):  # original extents × 0.8
        mask = ds[k][S.MASKS][0].numpy()
        assert set(np.unique(mask).tolist()) == {0.0, 1.0}
        expected = np.zeros((SIZE, SIZE), np.float32)
        expected[rows[0] : rows[1], cols[0] : cols[1]] = 1
        np.testing.assert_array_equal(mask, expected)


def test_eval_box_without_jitter_is_the_tight_box_of_the_mask():
    ds = _dataset(False, jitter=0.0)
    for k in range(len(ds)):
        s = ds[k]
        np.testing.assert_array_equal(s[S.BOXES][0].numpy(), box_from_mask(s[S.MASKS][0].numpy() > 0))


def test_jittered_box_contains_the_mask_box_within_jitter():
    for ds in (_dataset(True, jitter=5.0), _dataset(False, jitter=5.0)):
        for k in range(len(ds)):
            for _ in range(20):
                s = ds[k]
                tight = box_from_mask(s[S.MASKS][0].numpy() > 0)
                box = s[S.BOXES][0].numpy()
                grow = (box - tight) * np.array([-1, -1, 1, 1])
                assert (grow >= 0).all() and (grow <= 5.0 + 1e-5).all()


def test_jittered_box_stays_inside_the_resized_image():
    h, w = 32, 64
    for ds in (_dataset(True, jitter=5.0, classes=["corner"]), _dataset(False, jitter=5.0)):
        for k in range(len(ds)):
            for _ in range(20):
                x0, y0, x1, y1 = ds[k][S.BOXES][0].tolist()
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_per_component_evaluation_has_one_sample_per_component(blob_source):
    ds = PromptedDataset(blob_source(), LongestSideTransform(64), PromptsSection(per="component"), min_pixels=10, training=False, seed=0)
    assert len(ds) == 2 * 3  # two images × (two blobs + one bar)
    sizes = sorted(int(ds[k][S.META]["targets"][0].sum()) for k in range(3))
    assert sizes == [60, 100, 108]


def test_training_sample_holds_per_image_objects(blob_source):
    settings = PromptsSection(positive_points=2, negative_points=1, box_probability=0.5)
    ds = PromptedDataset(blob_source(), LongestSideTransform(64), settings, min_pixels=10, training=True, seed=0, per_image=4)
    sample = ds[0]
    assert sample[S.MASKS].shape == (4, 64, 64) and sample[S.BOXES].shape == (4, 4)
    assert sample[S.POINTS].shape == (4, 3, 2) and sample[S.POINT_LABELS].shape == (4, 3)
    assert len(sample[S.META]["class_ids"]) == 4


def test_per_component_index_comes_from_the_source_when_it_has_one(blob_source):
    class IndexedSource(blob_source):
        loads = 0

        def slice_components(self, i):
            return {1: [100, 60], 2: [108]}

        def load(self, i):
            IndexedSource.loads += 1
            return super().load(i)

    ds = PromptedDataset(IndexedSource(), LongestSideTransform(64), PromptsSection(per="component"), min_pixels=70, training=False, seed=0)
    assert IndexedSource.loads == 0  # nothing opened to count components
    assert len(ds) == 2 * 2  # per image: the 100 px blob and the 108 px bar; the 60 px blob is too small


def test_per_instance_evaluation_prompts_each_touching_car_on_its_own(tmp_path):
    """Cityscapes instanceIds: one sample per instance of >= min_pixels (the touching parked cars are
    one connected component but several samples), its target the instance, its box the instance's
    box scaled to the input; stuff classes stay one object per class."""
    from scipy import ndimage

    from samtune.datasets.cityscapes import CityscapesSource
    from samtune.datasets.synthetic import generate_cityscapes

    root = generate_cityscapes(tmp_path / "cs", n_train=0, n_val=1, size_wh=(256, 128))
    source = CityscapesSource(root, "val")
    instances, (_, label) = source.load_instances(0), source.load(0)
    transform = LongestSideTransform(128)  # 256 px wide -> scale 0.5
    ds = PromptedDataset(source, transform, PromptsSection(per="instance", box_jitter_px=0), min_pixels=20, training=False, seed=0)
    cars = [ds[k] for k in range(len(ds)) if ds[k][S.META]["class_ids"] == [13]]
    expected = sorted(int(n) for n in np.bincount(instances[label == 13])[1:] if n >= 20)
    assert sorted(int(c[S.META]["targets"][0].sum()) for c in cars) == expected
    assert ndimage.label(label == 13)[1] < len(cars)  # fewer components than car samples: cars touch
    for car in cars:
        target = car[S.META]["targets"][0]
        assert len(np.unique(instances[target])) == 1 and instances[target][0] > 0  # exactly one instance
        ys, xs = np.nonzero(target)
        x0, y0, x1, y1 = car[S.BOXES][0].tolist()
        assert abs(x0 - xs.min() / 2) <= 1 and abs(x1 - (xs.max() + 1) / 2) <= 1 and abs(y0 - ys.min() / 2) <= 1
    roads = [ds[k] for k in range(len(ds)) if ds[k][S.META]["class_ids"] == [0]]
    assert len(roads) == 1 and np.array_equal(roads[0][S.META]["targets"][0], label == 0)


def test_per_instance_training_samples_are_instances(tmp_path):
    from samtune.datasets.cityscapes import CityscapesSource
    from samtune.datasets.synthetic import generate_cityscapes

    root = generate_cityscapes(tmp_path / "cs", n_train=1, n_val=0, size_wh=(128, 64))
    source = CityscapesSource(root, "train")
    transform = LongestSideTransform(128)  # no resizing: masks are the original objects
    ds = PromptedDataset(source, transform, PromptsSection(per="instance", box_jitter_px=0), min_pixels=20, training=True, seed=0, per_image=16)
    instances, (_, label) = source.load_instances(0), source.load(0)
    sample = ds[0]
    for class_id, mask in zip(sample[S.META]["class_ids"], sample[S.MASKS][:, :64, :128].bool().numpy()):
        ids = np.unique(instances[mask])
        if class_id in (11, 13):  # person, car: one instance each
            assert len(ids) == 1 and ids[0] > 0 and np.array_equal(mask, (instances == ids[0]) & (label == class_id))
        else:
            assert np.array_equal(mask, label == class_id)


def test_training_objects_are_at_least_min_pixels_as_in_evaluation(blob_source):
    """per: component trains on the components of >= data.min_pixels (in the input frame: 40 px
    images at 80 px, so 4× the pixels); the 60 px blob is never one at min_pixels 70."""
    ds = PromptedDataset(blob_source(), LongestSideTransform(80), PromptsSection(per="component"), min_pixels=70, training=True, seed=0, per_image=8)
    samples = [ds[k % 2] for k in range(4)]
    sizes = {int(m.sum()) for s in samples for m, c in zip(s[S.MASKS], s[S.META]["class_ids"]) if c == 1}
    assert sizes == {400}  # the 100 px blob, 4× larger at 80 px
    small = PromptedDataset(blob_source(), LongestSideTransform(80), PromptsSection(per="component"), min_pixels=10, training=True, seed=0, per_image=16)
    sample = small[0]
    assert {int(m.sum()) for m, c in zip(sample[S.MASKS], sample[S.META]["class_ids"]) if c == 1} == {400, 240}
