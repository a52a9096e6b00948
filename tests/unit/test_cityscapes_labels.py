"""Cityscapes labelIds -> trainIds against the official cityscapesScripts table, and the folder reader."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from samtune import SamtuneError
from samtune.datasets.cityscapes import CLASS_NAMES, IGNORE_INDEX, CityscapesSource, map_label_ids

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


# ----------------------------------------------------------------------------------------------------


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
    assert set(np.unique(label).tolist()) <= set(range(19)) | {255}
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
