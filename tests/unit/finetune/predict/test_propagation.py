"""finetune/predict/propagation.py: a prompt on one slice carried through a volume, by boxes (every family)
or by SAM 2's memory; and ``eval.volume_mode: propagate`` in ``samtune evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samtune.adapters.registry import build_model, family_of, get_variant
from samtune.errors import SamtuneError
from samtune.finetune.predict.propagation import MARGIN, MemoryTracker, SlicePrompt, bbox, box_propagation, make_propagator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_box_propagation_follows_the_object_both_ways_and_stops_where_it_vanishes():
    calls, boxes = [], []

    def predict(image, box, points, labels):  # a model whose mask shrinks by one pixel a slice away from z = 5
        z = int(image[0, 0])
        calls.append(z)
        boxes.append((z, None if box is None else box.tolist()))
        mask = np.zeros(image.shape[:2], bool)
        r = 3 - abs(z - 5)
        if r > 0:
            mask[10 - r : 10 + r, 10 - r : 10 + r] = True
        return mask

    volume = box_propagation(predict, lambda z: np.full((20, 20), z, np.uint8), 12, SlicePrompt(5, box=np.array([5.0, 5, 15, 15])))
    assert volume.shape == (12, 20, 20)
    assert sorted(set(np.nonzero(volume)[0].tolist())) == [3, 4, 5, 6, 7]
    assert sorted(calls) == [2, 3, 4, 5, 6, 7, 8]  # one empty slice each way, then no further
    assert dict(boxes)[6] == [5.0, 5.0, 15.0, 15.0]  # slice 6 from slice 5's mask (7..13) + 2 px margin


def test_bbox_margin_grows_the_box_and_stays_in_the_image():
    mask = np.zeros((30, 40), bool)
    mask[0:10, 5:35] = True
    assert bbox(mask).tolist() == [5, 0, 35, 10]
    assert bbox(mask, MARGIN).tolist() == [2.0, 0.0, 38.0, 12.0]  # 10 % of 30 = 3 px in x; at least 2 px in y; clipped at 0


def test_families_without_memory_propagate_by_boxes():
    model = build_model("tiny", image_size=64)
    family = family_of("tiny")
    assert family.video_model(model, get_variant("tiny"), None) is None
    _, way = make_propagator("auto", model, family, get_variant("tiny"), None, family.make_transform(64), torch.device("cpu"))
    assert way == "box"
    with pytest.raises(SamtuneError, match="eval.propagation=memory.*no memory"):
        make_propagator("memory", model, family, get_variant("tiny"), None, family.make_transform(64), torch.device("cpu"))


def test_auto_falls_back_to_boxes_where_the_checkpoint_has_no_memory(caplog):
    """An EdgeTAM checkpoint file holds the image model only: memory refuses it, auto propagates
    with boxes and says why."""
    model, family = build_model("edgetam-tiny-random", image_size=64), family_of("edgetam-tiny-random")
    variant, official = get_variant("edgetam-tiny-random"), __file__  # any file: the memory modules cannot come from one
    with pytest.raises(SamtuneError, match="converts the official EdgeTAM file for the image model only"):
        make_propagator("memory", model, family, variant, official, family.make_transform(64), torch.device("cpu"))
    with caplog.at_level("WARNING"):
        _, way = make_propagator("auto", model, family, variant, official, family.make_transform(64), torch.device("cpu"))
    assert way == "box" and "propagating with boxes instead" in caplog.text


@pytest.fixture(scope="module")
def sam2():
    return build_model("sam2-tiny-random", image_size=64), family_of("sam2-tiny-random")


def test_memory_propagation_runs_on_the_int8_encoder_it_shares(sam2):
    """``samtune predict --precision int8``: the tracker's image modules are the quantised model's
    own (not a float copy, which could not take int8 weights)."""
    from samtune.finetune.runtime import inference_model

    model, family = sam2
    ready = inference_model(model, family, "int8")
    tracker, way = make_propagator("memory", ready, family, get_variant("sam2-tiny-random"), None, family.make_transform(64), torch.device("cpu"))
    assert way == "memory" and tracker.video_model.vision_encoder is ready.vision_encoder
    assert any(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in tracker.video_model.vision_encoder.modules())
    slices = np.random.default_rng(0).integers(0, 255, (4, 48, 40), dtype=np.uint8)
    volume = tracker(lambda z: slices[z], 4, SlicePrompt(1, box=np.array([8.0, 10, 30, 40])))
    assert volume.shape == (4, 48, 40) and volume.dtype == bool


def test_memory_tracker_segments_every_slice_outwards_from_the_prompted_one(sam2):
    model, family = sam2
    propagate, way = make_propagator("auto", model, family, get_variant("sam2-tiny-random"), None, family.make_transform(64), torch.device("cpu"))
    assert way == "memory" and isinstance(propagate, MemoryTracker)
    order = []
    forward = propagate.video_model.forward

    def spy(*args, **kwargs):
        order.append(kwargs["frame_idx"])
        return forward(*args, **kwargs)

    propagate.video_model.forward = spy
    rng = np.random.default_rng(0)
    slices = rng.integers(0, 255, (6, 48, 40), dtype=np.uint8)
    volume = propagate(lambda z: slices[z], 6, SlicePrompt(2, box=np.array([8.0, 10, 30, 40])))
    assert volume.shape == (6, 48, 40) and volume.dtype == bool
    # the prompted slice first, then away from it one way, then the other (the prompted slice's output is reused)
    assert order == [2, 2, 3, 4, 5, 2, 1, 0]


def test_memory_modules_come_from_a_folder_saved_from_the_video_model(sam2, tmp_path):
    from transformers import Sam2VideoModel

    from samtune.adapters.sam2_checkpoints import is_video_only_hf
    from samtune.adapters.sam2_video import video_model_from

    model, family = sam2
    reference = video_model_from(build_model("sam2-tiny-random", image_size=64, init_seed=3))
    reference.save_pretrained(tmp_path / "video")
    video = family.video_model(model, get_variant("sam2-tiny-random"), str(tmp_path / "video"))
    assert isinstance(video, Sam2VideoModel)
    ours, theirs, image = video.state_dict(), reference.state_dict(), model.state_dict()
    memory = [k for k in ours if is_video_only_hf(k)]
    assert memory and all(torch.equal(ours[k], theirs[k]) for k in memory)  # the folder's memory
    assert all(torch.equal(ours[k], image[k]) for k in image if k in ours)  # this model's image weights

    model.save_pretrained(tmp_path / "image")  # an image-model folder has no memory: refused, not random
    with pytest.raises(SamtuneError, match="holds no memory modules"):
        family.video_model(model, get_variant("sam2-tiny-random"), str(tmp_path / "image"))


def test_evaluate_scores_propagation_per_case_beside_slice_prompts(both_task_run, tmp_path, capsys):
    from samtune.finetune.cli import main

    recipe, run = both_task_run
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "last"), "--out", str(out),
                 "eval.volume_mode=propagate", "eval.propagation=box", "eval.max_samples=null"]) == 0  # fmt: skip
    metrics = json.loads(out.read_text())
    part = metrics["propagated"]
    assert part["propagation"] == "box"
    assert "covers the most pixels" in part["protocol"]["prompts"] and "bounding box" in part["protocol"]["propagation"]
    cases = {s["case"] for c in part["volume"]["per_class"].values() for s in c["per_case"]}
    assert cases == {s["case"] for c in metrics["prompted"]["volume"]["per_class"].values() for s in c["per_case"]}
    assert all(0.0 <= c["dice"] <= 1.0 for c in part["volume"]["per_class"].values() if c["dice"] == c["dice"])
    printed = capsys.readouterr().out
    assert "PROPAGATED validation (box" in printed and "Dice, box on every slice" in printed


def test_the_tracker_segments_the_prompted_slice_as_the_image_model_does(sam2, tracked_slices):
    """The same weights, the same box, the same single-mask token: the video tracker's prompted
    slice equals the fine-tuned image model's prediction (its other slices add the memory)."""
    model, family = sam2
    transform = family.make_transform(64)
    tracker, _ = make_propagator("memory", model, family, get_variant("sam2-tiny-random"), None, transform, torch.device("cpu"))
    tracked, image_mask = tracked_slices(tracker, model, family, transform)
    torch.testing.assert_close(tracked[1], image_mask, atol=1e-5, rtol=0)
