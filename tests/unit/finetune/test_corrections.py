"""finetune/corrections.py: the volume correction engine. The safety and carry-through rules on a stub family
whose answers are known exactly (prompts -> the bright structures they point at), then the real
tiny-pretrained SAM: a background click removes a false blob, embeddings are encoded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune.adapters.family import ClassPrompts, ImageEmbeddings, ModelFamily
from samtune.adapters.preprocess import LongestSideTransform
from samtune.errors import SamtuneError
from samtune.finetune.corrections import VolumeCorrector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, H, W = 12, 64, 64
ORGAN, OTHER, BLOB = 200, 200, 130  # intensities: class 0 (two organs), a grey false blob


def ellipsoid(z, y, x, rz, ry, rx) -> np.ndarray:
    zz, yy, xx = np.mgrid[:D, :H, :W]
    return ((zz - z) / rz) ** 2 + ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1


@pytest.fixture(scope="module")
def scene():
    organ, other, blob = ellipsoid(5.5, 20, 18, 4.2, 10, 9), ellipsoid(5.5, 44, 16, 6, 8, 8), ellipsoid(6, 40, 46, 2.6, 7, 7)
    volume = np.full((D, H, W), 40, np.uint8)
    volume[organ], volume[other], volume[blob] = ORGAN, OTHER, BLOB
    return volume, organ, other, blob


def level(value: int) -> float:  # an intensity after SAM's normalisation (channel 0)
    return (value - 123.675) / 58.395


class StubFamily(ModelFamily):
    """A "model" that answers exactly: class k's prompt = the pixels of its intensity band, a box =
    the non-background pixels inside it, a foreground click adds the non-background component under
    it, a background click removes it; a mask prompt is kept. Records every decoder call."""

    name = "stub"

    def __init__(self):
        self.calls, self.encoder_calls = [], 0

    def build(self, *args):
        raise NotImplementedError

    load_full = encoder_depth = export = prompt_dim = build

    def make_transform(self, image_size):
        return LongestSideTransform(image_size)

    def encode_images(self, model, pixel_values):
        self.encoder_calls += 1
        image = pixel_values[:, :1]
        return ImageEmbeddings(torch.nn.functional.avg_pool2d(image, 4), (image,))  # g = S/4: mask prompts S×S

    def decode_classes(self, model, embeddings, class_tokens):
        image = embeddings.high_res_features[0][:, 0]
        bands = [(image > level(165)), (image > level(85)) & (image < level(165))]
        return torch.stack([torch.where(bands[k], 5.0, -5.0) for k in range(len(class_tokens))], 1)

    def decode_prompts(self, model, embeddings, boxes=None, points=None, point_labels=None, mask_inputs=None, multimask_output=False, class_tokens=None):
        from scipy import ndimage

        self.calls.append({"box": boxes is not None, "clicks": 0 if points is None else points.shape[1], "mask": mask_inputs,
                           "class": class_tokens is not None})  # fmt: skip
        image = embeddings.high_res_features[0][:, 0]
        out = []
        for n in range(len(image)):
            structure = (image[n] > level(85)).numpy()
            answer = np.zeros(structure.shape, bool)
            if mask_inputs is not None:
                answer |= (mask_inputs[n, 0] > 0).numpy()
            if class_tokens is not None:
                k = int(class_tokens[0, 0]) if class_tokens.dim() == 2 else int(class_tokens[n, 0, 0])
                answer |= (self.decode_classes(model, ImageEmbeddings(image[n : n + 1, None], (image[n : n + 1, None],)), [0, 1])[0, k] > 0).numpy()
            if boxes is not None:
                x0, y0, x1, y1 = (int(round(float(v))) for v in boxes[n])
                inside = np.zeros(structure.shape, bool)
                inside[y0:y1, x0:x1] = True
                answer |= structure & inside
            parts, _ = ndimage.label(structure, structure=np.ones((3, 3), bool))
            for (x, y), label in zip(points[n].tolist() if points is not None else [], point_labels[n].tolist() if points is not None else []):
                part = parts[int(round(y)), int(round(x))]
                if part and label == 1:
                    answer |= parts == part
                elif part and label == 0:
                    answer &= parts != part
            out.append(torch.where(torch.from_numpy(answer), 5.0, -5.0))
        logits = torch.stack(out)[:, None].repeat(1, 3 if multimask_output else 1, 1, 1)
        return logits, torch.ones(logits.shape[:2])


class StubModel(torch.nn.Module):
    def __init__(self, class_prompts: bool = True):
        super().__init__()
        if class_prompts:
            self.class_prompts = ClassPrompts(2, 1, 4)
            with torch.no_grad():  # the stub reads the class from the first value
                self.class_prompts.tokens.copy_(torch.arange(2.0).view(2, 1, 1).expand(2, 1, 4))


def corrector(volume, class_prompts: bool = True, **kw) -> tuple[VolumeCorrector, StubFamily]:
    family = StubFamily()
    return VolumeCorrector(StubModel(class_prompts), family, family.make_transform(W), "cpu", lambda z: volume[z], D, **kw), family


@pytest.mark.parametrize("class_prompts", [True, False])
def test_a_foreground_click_in_a_missed_organ_adds_it_through_the_volume_and_nothing_else(scene, class_prompts):
    volume, organ, other, _ = scene
    engine, family = corrector(volume, class_prompts)
    out = engine.correct(other, 0, [(5, 20, 18)], [])
    assert out.dtype == bool and out.shape == (D, H, W)
    np.testing.assert_array_equal(out, organ | other)  # every slice of the organ, the other organ untouched
    clicked = family.calls[0]
    assert clicked["class"] == class_prompts and clicked["clicks"] == 1 and not clicked["box"]
    assert all(c["box"] and not c["class"] for c in family.calls[1:])  # carried by boxes
    assert len(family.calls) == 1 + organ.any((1, 2)).sum() - 1 + 2  # each organ slice once, one empty slice each way


def test_a_background_click_in_a_false_blob_removes_it_and_keeps_the_class(scene):
    volume, organ, other, blob = scene
    engine, _ = corrector(volume)
    out = engine.correct(organ | other | blob, 0, [], [(6, 40, 46)])
    np.testing.assert_array_equal(out, organ | other)


def test_a_click_never_wipes_the_class_where_the_model_disagrees_elsewhere(scene):
    """Only the clicked object changes on its slice: the class prompt's answer (here: nothing of a
    painted region the model does not see as class 0) is not applied to unclicked objects."""
    volume, organ, other, _ = scene
    painted = organ | other
    painted[:, 58:62, 58:62] = True  # a region the user painted by hand on every slice
    out = corrector(volume)[0].correct(painted, 0, [], [(5, 44, 16)])  # remove the second organ
    np.testing.assert_array_equal(out & ~other, painted & ~other)  # the organ and the painted region stay everywhere
    # the second organ goes where it is at most half of the class's mask; where it is more, a removal is refused
    minor = other.sum((1, 2)) <= 0.5 * painted.sum((1, 2))
    assert minor[5] and not (out & other)[minor].any() and np.array_equal(out[~minor], painted[~minor])


def test_the_automatic_result_is_the_mask_prompt_and_embeddings_are_encoded_once(scene):
    volume, organ, other, _ = scene
    engine, family = corrector(volume, batch_size=5)
    seen = []
    index = engine.automatic(progress=lambda done, total: seen.append((done, total)))
    assert index.dtype == np.uint8 and index.shape == (D, H, W)
    np.testing.assert_array_equal(index == 0, organ | other)
    assert seen == [(5, D), (10, D), (12, D)] and family.encoder_calls == 3 and engine.encoded == D
    mask = index == 0
    engine.correct(mask, 0, [(5, 40, 46)], [])  # a click on the grey blob (not class 0 in the automatic result)
    assert torch.equal(family.calls[0]["mask"], engine._class_low_res[5][None, 0:1])  # the automatic logits
    n = len(family.calls)
    engine.correct(mask & ~organ, 0, [(5, 20, 18)], [])  # the organ deleted: logits made from the mask
    made = family.calls[n]["mask"]
    assert made.shape == (1, 1, H, W) and made.max() == pytest.approx(6.9068, abs=1e-3) and made.min() == pytest.approx(-6.9068, abs=1e-3)
    assert engine.encoded == D and family.encoder_calls == 3  # clicks cost decoder passes only


def test_repeated_clicks_on_the_result_change_nothing_and_encode_nothing(scene):
    volume, organ, other, _ = scene
    engine, family = corrector(volume)
    first = engine.correct(other, 0, [(5, 20, 18)], [])
    encoded, calls = engine.encoded, len(family.calls)
    assert encoded == organ.any((1, 2)).sum() + 2  # the clicked slice, the carried ones and one beyond each end
    again = engine.correct(first, 0, [(5, 20, 18)], [])  # every click so far, as the evaluation sends them
    np.testing.assert_array_equal(again, first)
    assert engine.encoded == encoded and len(family.calls) == calls  # the same answer: no decoder pass


def touching_blob(volume, organ):
    """A grey false blob (not class 0) on slices 4-6 that touches the organ on slice 5, and the volume holding it."""
    from scipy import ndimage

    blob = ellipsoid(5, 20, 33, 1.5, 5, 7) & ~organ
    touching = (ndimage.binary_dilation(organ, np.ones((1, 3, 3), bool)) & blob).any((1, 2))
    assert touching.sum() == 1 and blob.any((1, 2)).sum() == 3
    volume = volume.copy()
    volume[blob] = BLOB
    return volume, blob


@pytest.mark.parametrize("class_prompts", [True, False])
def test_a_background_click_on_a_blob_touching_the_organ_never_takes_the_organ(scene, class_prompts):
    """The stub's click answer removes the whole structure under the click (organ + blob): with
    class prompts, the automatic logits keep the removal to pixels found as unlikely as the
    clicked one (the blob goes on every slice, the organ stays); without them the removal would
    take more than half of the slice's mask and is refused."""
    volume, organ, other, _ = scene
    volume, blob = touching_blob(volume, organ)
    engine, _ = corrector(volume, class_prompts)
    if class_prompts:
        engine.automatic()
    mask = organ | other | blob
    out = engine.correct(mask, 0, [], [(5, 20, 36)])
    kept = (out & organ).sum((1, 2)) / np.maximum(organ.sum((1, 2)), 1)
    assert (kept[organ.any((1, 2))] >= 0.95).all() and np.array_equal(out & other, other)
    if class_prompts:
        assert not (out & blob).any()  # the clicked slice and, carried, its neighbours
    else:
        np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize("class_prompts", [True, False])
def test_repeated_clicks_that_cannot_be_honoured_change_nothing(scene, class_prompts):
    """The evaluation sends a click again while its error persists, each time on the previous
    result: a click the engine refuses (removing most of the slice) leaves the mask as it is,
    and a click whose voxel is already right changes nothing and costs no decoder pass."""
    volume, organ, other, _ = scene
    engine, family = corrector(volume, class_prompts)
    if class_prompts:
        engine.automatic()
    mask = organ | other
    out = mask
    for n in range(1, 6):
        out = engine.correct(out, 0, [], [(5, 20, 18)] * n)
        np.testing.assert_array_equal(out, mask)
    calls = len(family.calls)
    np.testing.assert_array_equal(engine.correct(mask, 0, [(5, 20, 18)], [(5, 2, 2)]), mask)
    assert len(family.calls) == calls


def test_two_classes_of_a_checkpoint_without_class_prompts_do_not_share_what_is_remembered(scene):
    """class_index is None for every class there: the key names the object, so the second class's
    mask prompt is made from its own mask, not taken from the first class's answer."""
    volume, organ, other, _ = scene
    engine, family = corrector(volume, class_prompts=False)
    first = engine.correct(other, None, [(5, 20, 18)], [], key="liver")  # adds the organ on slice 5
    engine.correct(first, None, [], [(5, 44, 16)], key="spleen")  # same slice mask, another class
    assert set(engine._last) >= {(5, "liver"), (5, "spleen")}
    spleen = next(c for c in reversed(family.calls) if c["clicks"])
    assert spleen["mask"].max() == pytest.approx(6.9068, abs=1e-3)  # logits made from its own mask, not the liver's answer (±5)


def test_bad_input_is_refused_with_the_reason(scene):
    volume = scene[0]
    engine, _ = corrector(volume)
    with pytest.raises(SamtuneError, match="D×H×W with D = 12"):
        engine.correct(np.zeros((3, H, W), bool), 0, [], [])
    with pytest.raises(SamtuneError, match=r"click \(5, 64, 3\) is not a"):
        engine.correct(np.zeros((D, H, W), bool), 0, [(5, 64, 3)], [])
    with pytest.raises(SamtuneError, match="class_index 7 is not a class"):
        engine.correct(np.zeros((D, H, W), bool), 7, [], [])


def test_the_tiny_pretrained_sam_removes_a_false_blob_from_one_background_click(scene):
    """A real model (the shipped tiny-pretrained SAM, no class prompts): a grey false blob in the
    mask, a background click at its centre; the blob goes on every slice, the organ stays."""
    from samtune.adapters.registry import build_model, family_of

    volume, organ, _, _ = scene
    blob = ellipsoid(6, 44, 46, 2.6, 8, 8)
    rng = np.random.default_rng(0)
    image = np.full((D, H, W), 40.0) + rng.normal(0, 6, (D, H, W))
    image[organ], image[blob] = 200 + rng.normal(0, 6, organ.sum()), 130 + rng.normal(0, 6, blob.sum())
    image = image.clip(0, 255).astype(np.uint8)
    model, family = build_model("tiny-pretrained"), family_of("tiny-pretrained")
    engine = VolumeCorrector(model, family, family.make_transform(128), "cpu", lambda z: image[z], D)
    out = engine.correct(organ | blob, 0, [], [(6, 44, 46)])
    assert (out & blob).sum() < 0.2 * blob.sum() and (out & organ).sum() == organ.sum()
    encoded = engine.encoded
    engine.correct(out, None, [], [(6, 44, 46)])
    assert engine.encoded == encoded  # the second correction on the same slices encodes nothing
