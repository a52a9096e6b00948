"""Semantic samples for the automatic mode: class indexes of the label space, background, ignored pixels and padding."""

from __future__ import annotations

import numpy as np
import torch

from samtune.adapters.preprocess import LongestSideTransform
from samtune.datasets.cityscapes import TRAIN_CLASSES, cityscapes_label_space
from samtune.datasets.semantic import LABELS, META, SemanticDataset, collate_semantic
from samtune.datasets.source import LabelSpace, SliceSource


class TwoImages(SliceSource):
    class_names = {1: "a", 2: "b", 5: "c"}
    skipped: list = []

    def __init__(self):
        label = np.zeros((32, 64), np.uint8)
        label[:, :16] = 1
        label[:, 16:32] = 5
        label[:8, 32:] = 255
        label[8:, 48:] = 7  # a value that is no class of the space: background
        self.labels = [label, np.zeros((32, 64), np.uint8)]

    def __len__(self):
        return 2

    def item_id(self, index):
        return f"img{index}"

    def load(self, index):
        return np.full((32, 64), 100, np.uint8), self.labels[index].copy()


def test_labels_are_class_indexes_with_background_ignore_and_padding():
    source = TwoImages()
    space = source.label_space([1, 5])  # class 2 is not predicted
    assert space.names == ["a", "c"] and space.background_id == 0
    sample = SemanticDataset(source, LongestSideTransform(64), space, training=False)[0]
    labels = sample[LABELS].numpy()
    assert labels.shape == (64, 64)
    assert (labels[:32, :16] == 0).all() and (labels[:32, 16:32] == 1).all()  # class 1 -> 0, class 5 -> 1
    assert (labels[:8, 32:] == 255).all()  # ignored label
    assert (labels[8:32, 32:] == 2).all()  # background (0) and unknown value 7: index K = 2
    assert (labels[32:] == 255).all()  # padding of the square input never counts
    assert np.array_equal(sample[META]["label"], source.labels[0]) and sample[META]["original_size"] == (32, 64)
    empty = SemanticDataset(source, LongestSideTransform(64), space, training=False)[1]
    assert set(np.unique(empty[LABELS].numpy())) == {2, 255}  # an image without objects is a sample too
    batch = collate_semantic([sample, empty])
    assert batch[LABELS].shape == (2, 64, 64) and batch[LABELS].dtype == torch.uint8


def test_label_space_maps_indexes_to_source_and_file_values_and_round_trips():
    space = LabelSpace([1, 5], ["a", "c"])
    index_map = np.array([[0, 1, 2]])
    assert space.to_source_ids(index_map).tolist() == [[1, 5, 0]]
    assert LabelSpace.from_dict(space.to_dict()) == LabelSpace([1, 5], ["a", "c"], 0, [1, 5], 0)
    city = cityscapes_label_space(list(range(19)))
    assert city.background_id == 255 and city.file_background == 0  # no background class: void
    assert city.to_file_ids(np.array([0, 13, 19])).tolist() == [TRAIN_CLASSES[0][1], TRAIN_CLASSES[13][1], 0]
    assert city.to_source_ids(np.array([0, 19])).tolist() == [0, 255]


def test_a_source_without_an_index_counts_classes_from_its_label():
    source = TwoImages()
    assert source.slice_classes(0) == {0: 24 * 16, 1: 32 * 16, 5: 32 * 16, 7: 24 * 16}  # 255 not counted
    assert source.slice_classes(1) == {0: 32 * 64}
