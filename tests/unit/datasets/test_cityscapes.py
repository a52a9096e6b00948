"""datasets/cityscapes.py: labelIds -> trainIds against the official cityscapesScripts table, the folder reader,
labelTrainIds files and skip mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtune import SamtuneError
from samtune.adapters.preprocess import LongestSideTransform
from samtune.datasets.cityscapes import CLASS_NAMES, IGNORE_INDEX, CityscapesSource, map_label_ids
from samtune.datasets.prompted import PromptedDataset
from samtune.datasets.synthetic import generate_cityscapes
from samtune.finetune.recipe import PromptsSection

# cityscapesScripts/helpers/labels.py: (name, id, trainId); trainId 255 and -1 are not trained.
OFFICIAL = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
]  # fmt: skip
TRAIN_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip


def _expected_table() -> np.ndarray:
    table = np.full(256, 255, dtype=np.int64)
    for _, label_id, train_id in OFFICIAL:
        table[label_id] = train_id
    return table  # ids 34..255 (incl. 255 = uint8 view of "license plate" -1) stay 255


def test_every_one_of_256_label_ids_maps_like_the_official_table():
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = map_label_ids(ids)
    assert out.shape == ids.shape
    np.testing.assert_array_equal(out.ravel().astype(np.int64), _expected_table())


@pytest.mark.parametrize("label_id", [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 35, 100, 254, 255])
def test_non_training_ids_are_ignored(label_id):
    assert map_label_ids(np.array([[label_id]], dtype=np.uint8))[0, 0] == IGNORE_INDEX == 255


def test_the_19_train_ids_in_order():
    label_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    out = map_label_ids(np.array(label_ids, dtype=np.uint8)[None])
    assert out[0].tolist() == list(range(19))


def test_class_names():
    assert CLASS_NAMES == dict(enumerate(TRAIN_NAMES))


def test_source_pairs_each_image_with_its_label(cs_root):
    src = CityscapesSource(cs_root, "train")
    assert len(src) == 2
    assert [p.name for p in src.images] == [
        "aachen_000000_000019_leftImg8bit.png",
        "bochum_000000_000019_leftImg8bit.png",
    ]
    for image, label in zip(src.images, src.labels):
        assert label == cs_root / "gtFine" / "train" / image.parent.name / image.name.replace(
            "_leftImg8bit.png", "_gtFine_labelIds.png"
        )
    assert src.item_id(1) == "bochum_000000_000019"
    image, label = src.load(0)
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8
    raw = np.asarray(Image.open(src.labels[0]))
    np.testing.assert_array_equal(label, map_label_ids(raw))  # trainIds, not raw labelIds
    # a hand-checked pixel class, not just "some trainId": road (labelId 7) is trainId 0, sky (23) is 10
    assert (raw == 7).any() and (label[raw == 7] == 0).all() and (label[raw == 23] == 10).all()
    np.testing.assert_array_equal(src.load_label(0), label)
    assert src.class_names == CLASS_NAMES
    assert len(CityscapesSource(cs_root, "val")) == 1


def test_missing_label_file_names_the_file(cs_root):
    missing = cs_root / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(SamtuneError) as info:
        CityscapesSource(cs_root, "train")
    assert str(missing) in str(info.value)


def test_missing_split_folder(cs_root):
    with pytest.raises(SamtuneError, match="leftImg8bit"):
        CityscapesSource(cs_root, "test")


def test_image_label_size_mismatch(cs_root):
    src = CityscapesSource(cs_root, "train")
    with Image.open(src.labels[0]) as img:
        img.resize((64, 32), Image.NEAREST).save(src.labels[0])
    with pytest.raises(SamtuneError) as info:
        src.load(0)
    assert str(src.images[0]) in str(info.value)
    src.load(1)  # the other pair is still fine


def test_macos_resource_fork_files_are_ignored(cs_root):
    fork = cs_root / "leftImg8bit" / "train" / "aachen" / "._aachen_000000_000019_leftImg8bit.png"
    fork.write_bytes(b"\x00\x05\x16\x07AppleDouble")  # no label beside it, not a PNG
    src = CityscapesSource(cs_root, "train")
    assert fork not in src.images
    assert len(src) == 2


def test_city_filter(cs_root):
    everything = CityscapesSource(cs_root, "train")
    cities = sorted({p.parent.name for p in everything.images})
    assert len(cities) >= 2
    only = CityscapesSource(cs_root, "train", cities=[cities[0]])
    assert {p.parent.name for p in only.images} == {cities[0]} and 0 < len(only) < len(everything)
    with pytest.raises(SamtuneError, match="data.cities"):
        CityscapesSource(cs_root, "train", cities=["atlantis"])


def test_label_train_ids_are_used_when_present_and_agree(cs_root, write_train_ids):
    mapped = CityscapesSource(cs_root, "train")
    expected = [mapped.load_label(i) for i in range(len(mapped))]
    assert mapped.train_ids == [False, False]
    write_train_ids(cs_root)
    src = CityscapesSource(cs_root, "train")
    assert src.train_ids == [True, True] and all(p.name.endswith("_gtFine_labelTrainIds.png") for p in src.labels)
    for i in range(len(src)):
        np.testing.assert_array_equal(src.load_label(i), expected[i])  # both agree
        np.testing.assert_array_equal(src.load(i)[1], expected[i])
    assert src.slice_classes(0) == mapped.slice_classes(0)


def test_cityscapes_skip_mode_lists_a_missing_label(cs_root):
    missing = next(cs_root.glob("gtFine/train/*/*_gtFine_labelIds.png"))
    missing.unlink()
    src = CityscapesSource(cs_root, "train", on_bad_case="skip")
    assert len(src) == 1 and len(src.skipped) == 1 and str(missing) in src.skipped[0]["problem"]


# ------------------------------------------------------ bad inputs: unknown ids, 16-bit labels


def _first_train_label(root: Path) -> Path:
    return sorted(root.glob("gtFine/train/*/*_gtFine_labelIds.png"))[0]


def test_label_ids_that_cityscapes_does_not_have_are_a_bad_case(cs_root):
    label = _first_train_label(cs_root)
    ids = np.asarray(Image.open(label)).copy()
    ids[:4, :4] = 34
    ids[4:6, :4] = 40
    Image.fromarray(ids).save(label)
    with pytest.raises(SamtuneError) as info:
        CityscapesSource(cs_root, "train")
    message = str(info.value)
    assert str(label) in message and "[34, 40]" in message and "0..33" in message and "json2labelImg" in message
    src = CityscapesSource(cs_root, "train", on_bad_case="skip")
    assert len(src) == 1 and label not in src.labels
    assert len(src.skipped) == 1 and src.skipped[0]["file"] == str(label) and "[34, 40]" in src.skipped[0]["problem"]


def test_train_id_files_hold_0_to_18_and_255_only(cs_root):
    label = _first_train_label(cs_root)
    train_ids = label.with_name(label.name.replace("_labelIds", "_labelTrainIds"))
    mapped = map_label_ids(np.asarray(Image.open(label)))
    Image.fromarray(mapped).save(train_ids)
    assert len(CityscapesSource(cs_root, "train")) == 2  # 0..18 and 255: fine
    mapped[:3, :3] = 19
    Image.fromarray(mapped).save(train_ids)
    with pytest.raises(SamtuneError, match=r"values \[19\].*not Cityscapes trainIds.*createTrainIdLabelImgs") as info:
        CityscapesSource(cs_root, "train")
    assert str(train_ids) in str(info.value)


def test_sixteen_bit_label_png_is_skipped_like_any_bad_case(cs_root):
    label = _first_train_label(cs_root)
    Image.fromarray(np.asarray(Image.open(label)).astype(np.uint16)).save(label)
    with pytest.raises(SamtuneError, match="16-bit label PNG") as info:
        CityscapesSource(cs_root, "train")
    assert str(label) in str(info.value)
    src = CityscapesSource(cs_root, "train", on_bad_case="skip")
    assert len(src) == 1 and src.skipped[0]["file"] == str(label) and "8-bit" in src.skipped[0]["problem"]
    for i in range(len(src)):
        src.load(i)  # the rest trains


def test_class_counts_come_from_the_scan_at_construction(cs_root):
    src = CityscapesSource(cs_root, "train")
    expected = []
    for i in range(len(src)):
        ids, counts = np.unique(src.load_label(i), return_counts=True)
        expected.append({int(k): int(n) for k, n in zip(ids, counts) if k != IGNORE_INDEX})
    for label in src.labels:
        label.unlink()  # slice_classes must not read the labels again
    assert [src.slice_classes(i) for i in range(len(src))] == expected
    assert all(expected) and all(set(e) <= set(CLASS_NAMES) for e in expected)


def test_many_labels_are_scanned_in_order_and_bad_ones_left_out(tmp_path):
    root = generate_cityscapes(tmp_path / "cs", n_train=7, n_val=1, size_wh=(64, 32))
    labels = sorted(root.glob("gtFine/train/*/*_gtFine_labelIds.png"))
    for bad in (labels[2], labels[5]):
        ids = np.asarray(Image.open(bad)).copy()
        ids[0, 0] = 200
        Image.fromarray(ids).save(bad)
    with pytest.raises(SamtuneError, match="200") as info:
        CityscapesSource(root, "train")
    assert str(labels[2]) in str(info.value)  # the first bad one, in file order
    src = CityscapesSource(root, "train", on_bad_case="skip")
    assert src.labels == [p for i, p in enumerate(labels) if i not in (2, 5)]
    assert [s["file"] for s in src.skipped] == [str(labels[2]), str(labels[5])]
    assert len(src.counts) == len(src) == 5


# ---------------------------------------------------------------------------------- instances
def test_instances_are_the_instance_ids_of_thing_classes(tmp_path):
    """load_instances numbers the ids >= 1000 of *_gtFine_instanceIds.png (groups and stuff: 0);
    slice_instances gives each trainId's instance sizes; instance_ids is the file as it is."""
    root = generate_cityscapes(tmp_path / "cs", n_train=0, n_val=2, size_wh=(256, 128))
    src = CityscapesSource(root, "val")
    assert src.instance_problem() is None
    for i in range(len(src)):
        with Image.open(src.instance_file(i)) as img:
            raw = np.asarray(img).astype(np.int32)
        assert np.array_equal(src.instance_ids(i), raw)
        instances = src.load_instances(i)
        assert instances.dtype == np.uint16 and np.array_equal(instances > 0, raw >= 1000)
        ids = sorted(np.unique(raw[raw >= 1000]).tolist())
        assert sorted(np.unique(instances[instances > 0]).tolist()) == list(range(1, len(ids) + 1))
        for number, value in enumerate(ids, start=1):  # one instance number per id, in id order
            assert np.array_equal(instances == number, raw == value)
        expected: dict[int, list[int]] = {}
        for value in ids:
            expected.setdefault(int(map_label_ids(np.array([[value // 1000]], np.uint8))[0, 0]), []).append(int((raw == value).sum()))
        assert src.slice_instances(i) == {c: sorted(s, reverse=True) for c, s in sorted(expected.items())}


def test_missing_instance_files_are_named_for_per_instance_prompts(cs_root):
    victim = next((cs_root / "gtFine" / "train").glob("*/*_gtFine_instanceIds.png"))
    victim.unlink()
    src = CityscapesSource(cs_root, "train")  # the labels alone are enough for everything else
    assert str(victim) in src.instance_problem()
    with pytest.raises(SamtuneError, match="prompts.per=instance: 1 of 2 images have no _gtFine_instanceIds.png"):
        PromptedDataset(src, LongestSideTransform(64), PromptsSection(per="instance"), min_pixels=10, training=True, seed=0)
    PromptedDataset(src, LongestSideTransform(64), PromptsSection(per="component"), min_pixels=10, training=True, seed=0)


def test_an_instance_file_of_the_wrong_size_is_named(cs_root):
    path = next((cs_root / "gtFine" / "val").glob("*/*_gtFine_instanceIds.png"))
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(path)
    with pytest.raises(SamtuneError, match=r"instanceIds file is a single-channel 16-bit PNG the size of its label \(128×64\)"):
        CityscapesSource(cs_root, "val").load_instances(0)
