"""Recipe files, validation messages, command-line overrides, dumping and the recipe-keys table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from samtune import SamtuneError
from samtune.finetune.recipe import (
    Recipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    recipe_table,
    validate_recipe,
)

REPO = Path(__file__).resolve().parents[3]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
MINIMAL = "data:\n  kind: nifti\n  root: some/where\n"


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(SamtuneError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_the_repo_ships_recipes():
    assert REPO / "recipes" / "demo.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    # every key written in the file is kept (nothing silently dropped or defaulted over)
    raw = yaml.safe_load(path.read_text())
    dumped = yaml.safe_load(dump_recipe(recipe))

    def check(node, ref, prefix):
        for key, value in node.items():
            assert key in ref, f"{prefix}{key}"
            if isinstance(value, dict):
                check(value, ref[key], f"{prefix}{key}.")

    check(raw, dumped, "")


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL))
    assert recipe.data.kind == "nifti" and recipe.data.root == "some/where"
    assert recipe.model.name == "tiny" and recipe.train.steps == 500 and recipe.adapter.lora.rank == 4
    assert recipe.data.window_hu == (-160.0, 240.0)


# ---------------------------------------------- errors ---------------------------------------------
def test_unknown_key_suggests_the_closest_valid_key(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  step: 100\n")
    msg = _error(path)
    assert str(path) in msg
    assert "`train.step`" in msg and "did you mean `train.steps`?" in msg


def test_unknown_nested_and_top_level_keys(tmp_path):
    msg = _error(_write(tmp_path, MINIMAL + "adapter:\n  lora:\n    rnak: 8\nmodle:\n  name: tiny\n"))
    assert "did you mean `adapter.lora.rank`?" in msg
    assert "did you mean `model`?" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = _error(_write(tmp_path, MINIMAL + "train:\n  lr: fast\n"))
    assert "`train.lr`" in msg and "'fast'" in msg


def test_out_of_range_value(tmp_path):
    msg = _error(_write(tmp_path, MINIMAL + "train:\n  steps: 0\n"))
    assert "`train.steps`" in msg


def test_missing_required_key(tmp_path):
    msg = _error(_write(tmp_path, "data:\n  kind: nifti\n"))
    assert "`data.root`" in msg and "missing" in msg
    msg = _error(_write(tmp_path, "train:\n  steps: 5\n", "nodata.yaml"))
    assert "`data`" in msg and "missing" in msg


def test_several_problems_reported_together_in_one_error(tmp_path):
    path = _write(tmp_path, "data:\n  kind: dicomdir\ntrain:\n  step: 100\n  lr: fast\nmodle: {}\n")
    msg = _error(path)
    assert msg.startswith(str(path))
    assert "4 problems" in msg  # with an unknown kind, the data keys cannot be checked yet
    for fragment in ("`data.kind` = 'dicomdir': unknown data format", "`train.step`", "`train.lr`", "`modle`"):
        assert fragment in msg
    msg = _error(_write(tmp_path, "data:\n  kind: nifti\ntrain:\n  step: 100\n"))
    assert "2 problems" in msg and "`data.root`: required key is missing" in msg


# -------------------------------------- one data section per kind --------------------------------------
def test_a_key_of_another_kind_names_the_kind_it_belongs_to(tmp_path):
    msg = _error(_write(tmp_path, "data: {kind: cityscapes, root: x}\n"), ["data.context_slices=2"])
    assert "`data.context_slices`: a key of data.kind=nifti / dicom, not of data.kind=cityscapes" in msg
    msg = _error(_write(tmp_path, "data: {kind: folder2d, root: x, generate_demo: true}\n"))
    assert "a key of data.kind=cityscapes / bdd100k / acdc / mapillary / nifti / coco / dicom, not of data.kind=folder2d" in msg


def test_data_kind_is_required_and_checked(tmp_path):
    assert "`data.kind`: required key is missing (one of: cityscapes, bdd100k, acdc, mapillary, nifti, folder2d, coco, dicom)" in _error(_write(tmp_path, "data: {root: x}\n"))
    assert "did you mean `cityscapes`?" in _error(_write(tmp_path, "data: {kind: cityscape, root: x}\n"))


def test_each_kind_gets_its_own_section(tmp_path):
    from samtune.datasets.cityscapes import CityscapesData
    from samtune.datasets.folder2d import Folder2DData
    from samtune.datasets.nifti import NiftiData

    for kind, section in (("nifti", NiftiData), ("cityscapes", CityscapesData), ("folder2d", Folder2DData)):
        recipe = load_recipe(_write(tmp_path, f"data: {{kind: {kind}, root: x}}\n"))
        assert type(recipe.data) is section
    assert load_recipe(_write(tmp_path, MINIMAL)).data.intensity_setting() == (-160.0, 240.0)
    assert load_recipe(_write(tmp_path, "data: {kind: folder2d, root: x}\n")).data.intensity_setting() is None


def test_invalid_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "data:\n  kind: [nifti\n  root: x\n")
    msg = _error(path)
    assert str(path) in msg and "YAML" in msg


def test_non_mapping_recipe_and_missing_file(tmp_path):
    path = _write(tmp_path, "- a\n- b\n")
    assert str(path) in _error(path)
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _error(missing)


# --------------------------------------------- overrides -------------------------------------------
def test_override_values_are_parsed_and_typed(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, MINIMAL),
        ["train.lr=3e-4", "data.classes=[liver,spleen]", "train.steps=7", "output.dir=runs/x", "model.checkpoint="],
    )
    assert isinstance(recipe.train.lr, float) and recipe.train.lr == pytest.approx(0.0003)
    assert recipe.data.classes == ["liver", "spleen"]
    assert recipe.train.steps == 7 and recipe.output.dir == "runs/x" and recipe.model.checkpoint is None


def test_overrides_create_nested_sections_and_keep_siblings(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  steps: 9\n")
    recipe = load_recipe(path, ["adapter.lora.rank=8", "eval.max_samples=3", "train.batch_size=2"])
    assert recipe.adapter.lora.rank == 8 and recipe.adapter.lora.alpha == 4.0
    assert recipe.eval.max_samples == 3
    assert recipe.train.steps == 9 and recipe.train.batch_size == 2  # existing keys in the section survive


def test_apply_overrides_on_a_plain_dict():
    raw = apply_overrides({"train": {"steps": 1}}, ["train.steps=2", "a.b.c=[1, 2]", "seed=3"])
    assert raw == {"train": {"steps": 2}, "a": {"b": {"c": [1, 2]}}, "seed": 3}


def test_malformed_override(tmp_path):
    msg = _error(_write(tmp_path, MINIMAL), ["train.lr"])
    assert "train.lr" in msg and "key.path=value" in msg


def test_bad_override_key_is_reported_with_a_suggestion(tmp_path):
    path = _write(tmp_path, MINIMAL)
    msg = _error(path, ["train.step=3"])
    assert str(path) in msg and "did you mean `train.steps`?" in msg and "train.step=3" in msg


# ------------------------------------------ dump and table -----------------------------------------
def test_dump_round_trips(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, MINIMAL),
        ["data.classes=[liver]", "data.window_hu=[-100, 300]", "eval.max_samples=4", "adapter.lora.alpha=8"],
    )
    text = dump_recipe(recipe)
    assert validate_recipe(yaml.safe_load(text)) == recipe
    # and from a file, as `samtune train` writes OUTPUT/recipe.yaml
    assert load_recipe(_write(tmp_path, text, "dumped.yaml")) == recipe


def _leaf_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_recipe_table_has_a_row_for_every_leaf_key(tmp_path):
    leaves = set()
    for kind in ("nifti", "cityscapes", "bdd100k", "acdc", "mapillary", "folder2d", "coco", "dicom"):
        leaves |= _leaf_keys(yaml.safe_load(dump_recipe(load_recipe(_write(tmp_path, f"data: {{kind: {kind}, root: x}}\n")))))
    assert {"train.lr", "adapter.lora.rank", "data.window_hu", "data.cities", "seed", "output.dir"} <= leaves
    lines = recipe_table().splitlines()
    assert lines[0].startswith("| key |")
    kind_rows = [line for line in lines[2:] if line.startswith("| ***data.kind: ")]
    assert [r.split("***")[1] for r in kind_rows] == ["data.kind: cityscapes", "data.kind: bdd100k", "data.kind: acdc", "data.kind: mapillary", "data.kind: nifti",
                                                           "data.kind: folder2d", "data.kind: coco", "data.kind: dicom"]
    rows = {line.split("|")[1].strip().strip("`"): line for line in lines[2:] if line not in kind_rows}
    assert set(rows) == leaves
    for key, line in rows.items():
        meaning = line.rstrip().rstrip("|").split("|")[-1].strip()
        assert meaning and meaning != "None", key
    assert "*required*" in rows["data.kind"] and "*required*" in rows["data.root"]
    assert "`500`" in rows["train.steps"]


def test_task_and_automatic_keys(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL + "task: both\nautomatic:\n  ratio: 0.3\n  class_weights: {liver: 2}\n"))
    assert recipe.task == "both" and recipe.automatic.ratio == 0.3 and recipe.automatic.class_weights == {"liver": 2.0}
    assert load_recipe(_write(tmp_path, MINIMAL)).task == "promptable" and recipe.eval.box_jitter_px == 0.0
    msg = _error(_write(tmp_path, MINIMAL + "task: semantic\n"))
    assert "`task`" in msg and "automatic" in msg
    msg = _error(_write(tmp_path, MINIMAL + "automatic:\n  threshold: 1.5\n  class_weights: {liver: -1}\n"))
    assert "automatic.threshold" in msg and "automatic.class_weights" in msg
