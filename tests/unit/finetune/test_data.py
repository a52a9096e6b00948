"""finetune/data.py: the evaluation prompt protocol (tight boxes unless eval.box_jitter_px)."""

from __future__ import annotations

import numpy as np

from samtune.adapters.preprocess import LongestSideTransform
from samtune.datasets import sample as S
from samtune.datasets.prompts import box_from_mask
from samtune.finetune.data import make_prompted
from samtune.finetune.recipe import validate_recipe


def _recipe(**eval_keys):
    return validate_recipe({"data": {"kind": "nifti", "root": "x", "min_pixels": 1}, "prompts": {"box_jitter_px": 6}, "eval": eval_keys})


def test_evaluation_boxes_are_tight_unless_eval_box_jitter_px(blob_source):
    source = blob_source()
    transform = LongestSideTransform(40)
    tight = make_prompted(source, _recipe(), transform, training=False)
    for k in range(len(tight)):
        sample = tight[k]
        assert np.array_equal(sample[S.BOXES][0].numpy(), box_from_mask(sample[S.MASKS][0].numpy() > 0))
    jittered = make_prompted(source, _recipe(box_jitter_px=6), transform, training=False)
    assert any(not np.array_equal(jittered[k][S.BOXES], tight[k][S.BOXES]) for k in range(len(tight)))
    train = make_prompted(source, _recipe(), transform, training=True)
    assert train.prompts.box_jitter_px == 6  # training keeps its own jitter
