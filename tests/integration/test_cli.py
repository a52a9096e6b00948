"""One tiny end-to-end run per CLI command on generated data: exact files written, sane metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from samtune.adapters.registry import build_sam
from samtune.datasets.synthetic import generate_cityscapes, generate_ct_phantom
from samtune.finetune.cli import main

STEPS = 24


def write_recipe(path: Path, data: dict, out: Path, **sections) -> Path:
    recipe = {
        "seed": 0,
        "data": data,
        "model": {"name": "tiny", "image_size": 64},
        "train": {"steps": STEPS, "batch_size": 4, "lr": 2e-3, "eval_every": 12, "log_every": 4},
        "prompts": {"box_jitter_px": 2},
        "eval": {"batch_size": 16, "max_samples": 40},
        "output": {"dir": str(out)},
    }
    recipe.update(sections)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    """A finished training run on a small CT phantom (shared by the tests of this module)."""
    tmp = tmp_path_factory.mktemp("ct")
    root = generate_ct_phantom(tmp / "data", n_cases=3, shape=(48, 48, 12))
    recipe = write_recipe(tmp / "recipe.yaml", {"kind": "nifti", "root": str(root), "val_fraction": 0.34}, tmp / "run")
    assert main(["-q", "train", str(recipe)]) == 0
    return recipe, tmp / "run"


def test_train_writes_exactly_the_documented_files(ct_run):
    _, run = ct_run
    for ckpt in ("last", "best"):
        files = sorted(p.name for p in (run / "checkpoints" / ckpt).iterdir())
        # README.md: samtune's model card (replacing peft's template)
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "classes.json", "recipe.yaml", "trainer_state.json"]
        card = (run / "checkpoints" / ckpt / "README.md").read_text()
        step = json.loads((run / "checkpoints" / ckpt / "trainer_state.json").read_text())["step"]
        assert "Research use only" in card and f"## Validation at step {step}" in card and "| liver |" in card
        assert "licence of the base weights: none: random initialisation" in card and "training: 2 cases" in card
        codes = json.loads((run / "checkpoints" / ckpt / "classes.json").read_text())["codes"]  # from samtune's organ table
        assert codes["liver"]["type"].startswith("SCT:10200004") and codes["kidney_left"]["modifier"].startswith("SCT:7771000")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]  # no temp leftovers
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.json", "per_case.csv", "recipe.yaml", "report.html", "states", "tensorboard"]
    # a training state at the evaluation of step 12 (none at the last step: the run is complete)
    assert sorted(p.name for p in (run / "states").iterdir()) == ["step_000012"]
    assert sorted(p.name for p in (run / "states" / "step_000012").iterdir()) == [
        "optimizer.pt", "recipe.yaml", "rng.safetensors", "state.json", "trainable.safetensors"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_prompted", "train/lr_lora", "train/lr_modules", "train/masks_per_s", "train/peak_memory_gb",
            "val_prompted/miou", "val_prompted_iou/liver"} <= tags, tags  # fmt: skip
    assert all(e.value > 0 for e in events.Scalars("train/masks_per_s"))
    # train.image_every (default: each evaluation): pictures of fixed validation samples, every evaluation step
    images = events.Tags()["images"]
    assert images and all(tag.startswith("val_prompted_images/") for tag in images), images
    first = events.Images(images[0])
    assert [e.step for e in first] == sorted({e.step for e in first}) and len(first) == STEPS // 12 and first[0].width > 0
    metrics = json.loads((run / "metrics.json").read_text())
    prompted = metrics["prompted"]  # task: promptable (default): no semantic part
    assert "semantic" not in metrics and metrics["headline"] == "prompted" and metrics["miou"] == prompted["miou"]
    assert set(prompted["per_class"]) == {"liver", "spleen", "kidney_right", "kidney_left"}
    for values in prompted["per_class"].values():
        assert values["samples"] > 0  # every organ of the val case was scored
    assert math.isfinite(metrics["miou"]) and math.isfinite(metrics["mdice"])
    assert metrics["step"] == STEPS and metrics["baseline"]["prompted"]["per_class"].keys() == prompted["per_class"].keys()
    assert prompted["protocol"]["first_prompt"] == "box" and prompted["protocol"]["box_jitter_px"] == 0.0
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["encoder_lora"] + metrics["parameters"]["mask_decoder"]
    volume = prompted["volume"]  # NIfTI: per-case 3D Dice / HD95 / NSD in mm
    assert set(volume["per_class"]) == set(prompted["per_class"]) and volume["nsd_tolerance_mm"] == 2.0
    for values in volume["per_class"].values():
        assert values["cases"] >= 1 and len(values["per_case"]) == 1 and 0.0 <= values["dice"] <= 1.0
    rows = (run / "per_case.csv").read_text().splitlines()
    assert rows[0] == "case,class,dice,hd95_mm,nsd" and len(rows) == 1 + 4  # one val case, four organs
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["miou"] == pytest.approx(metrics["miou"])
    classes = json.loads((run / "checkpoints" / "last" / "classes.json").read_text())
    assert classes["task"] == "promptable" and classes["tokens"] == 0 and classes["label_space"]["names"] == ["liver", "spleen", "kidney_right", "kidney_left"]


def test_unwritable_output_dir_stops_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    recipe = write_recipe(tmp_path / "r.yaml", {"kind": "nifti", "root": str(tmp_path / "nowhere")}, tmp_path / "a_file" / "run")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "output.dir=" in err and "cannot write there" in err and "Traceback" not in err
    assert "data.root" not in err  # checked first: nothing else was attempted


def test_skipped_case_is_listed_once_in_metrics(tmp_path):
    import nibabel as nib
    import numpy as np

    root = generate_ct_phantom(tmp_path / "data", n_cases=4, shape=(48, 48, 12))
    victim = sorted((root / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(str(victim))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(victim))
    recipe = write_recipe(
        tmp_path / "r.yaml", {"kind": "nifti", "root": str(root), "val_fraction": 0.34, "on_bad_case": "skip"}, tmp_path / "run",
        train={"steps": 2, "batch_size": 2, "eval_every": 2},
    )  # fmt: skip
    assert main(["-q", "train", str(recipe)]) == 0
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_cases"]
    assert [s["file"] for s in skipped] == [str(victim)]


def test_resolved_recipe_is_saved_and_reloadable(ct_run, tmp_path):
    recipe, run = ct_run
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train"]["steps"] == STEPS and saved["train"]["weight_decay"] == 0.01  # defaults filled in
    assert main(["-q", "validate", str(run / "recipe.yaml")]) == 0


def test_evaluate_reproduces_the_end_of_training(ct_run, tmp_path):
    recipe, run = ct_run
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "last"), "--out", str(out)]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads(out.read_text())
    assert evaluated["miou"] == pytest.approx(trained["miou"], abs=1e-9)
    for name, values in trained["prompted"]["per_class"].items():
        assert evaluated["prompted"]["per_class"][name]["iou"] == pytest.approx(values["iou"], abs=1e-9)


def test_evaluate_default_output_path(ct_run):
    recipe, run = ct_run
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "best")]) == 0
    assert (run / "eval" / "metrics.json").is_file()


def test_saved_adapter_loads_with_plain_peft(ct_run):
    _, run = ct_run
    folder = run / "checkpoints" / "last"
    base = build_sam("tiny", image_size=64)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    untouched = build_sam("tiny", image_size=64).eval()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 40.0]], [[20.0, 10.0, 60.0, 50.0]]])
    with torch.no_grad():
        a = model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks
        b = PeftModel.from_pretrained(build_sam("tiny", image_size=64), str(folder)).eval()(
            pixel_values=pixels, input_boxes=boxes, multimask_output=False
        ).pred_masks
        c = untouched(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks
    assert torch.equal(a, b)  # deterministic reload
    assert not torch.allclose(a, c)  # and the fine-tuned weights really are in the folder


def test_train_on_cityscapes_tree(tmp_path):
    root = generate_cityscapes(tmp_path / "cs", n_train=2, n_val=1, size_wh=(128, 64))
    recipe = write_recipe(tmp_path / "r.yaml", {"kind": "cityscapes", "root": str(root), "min_pixels": 20}, tmp_path / "run")
    assert main(["-q", "train", str(recipe), "train.steps=6", "train.eval_every=6"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "volume" not in metrics["prompted"]  # 2D data: no per-case 3D metrics
    assert {"road", "sidewalk", "building", "sky", "car"} <= set(metrics["prompted"]["per_class"])
    assert all(name in {"road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                        "motorcycle", "bicycle"} for name in metrics["prompted"]["per_class"])  # fmt: skip


def test_demo_data_command_writes_both_datasets(tmp_path):
    assert main(["demo-data", "--out", str(tmp_path), "--kind", "all"]) == 0
    ct = tmp_path / "Dataset900_CTPhantom"
    assert (ct / "dataset.json").is_file()
    assert len(list((ct / "imagesTr").glob("*_0000.nii.gz"))) == len(list((ct / "labelsTr").glob("*.nii.gz"))) > 0
    cs = tmp_path / "cityscapes"
    images = sorted((cs / "leftImg8bit").glob("*/*/*_leftImg8bit.png"))
    labels = sorted((cs / "gtFine").glob("*/*/*_gtFine_labelIds.png"))
    assert images and len(images) == len(labels)
    assert {p.parts[-3] for p in images} == {"train", "val"}


def test_bad_recipe_key_is_one_clear_error(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data: {kind: nifti, root: x}\ntrain: {stepz: 3, lr: fast}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "train.stepz" in err and "did you mean `train.steps`" in err and "train.lr" in err
    assert "Traceback" not in err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", {"kind": "nifti", "root": str(tmp_path / "nowhere")}, tmp_path / "run")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "nowhere" in err and "generate_demo" in err


def test_image_without_label_names_the_file(tmp_path, capsys):
    root = generate_cityscapes(tmp_path / "cs", n_train=2, n_val=1, size_wh=(128, 64))
    victim = sorted((root / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))[0]
    victim.unlink()
    recipe = write_recipe(tmp_path / "r.yaml", {"kind": "cityscapes", "root": str(root)}, tmp_path / "run")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "Traceback" not in err


def test_generate_demo_creates_missing_root(tmp_path, monkeypatch):
    from samtune.datasets import synthetic

    made = {}

    def small_phantom(out_dir, seed=0):
        made["called"] = True
        return generate_ct_phantom(out_dir, n_cases=3, shape=(48, 48, 12), seed=seed)

    monkeypatch.setattr(synthetic, "generate_ct_phantom", small_phantom)
    root = tmp_path / "demo" / "Dataset900_CTPhantom"
    data = {"kind": "nifti", "root": str(root), "generate_demo": True, "val_fraction": 0.34}
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run")
    assert main(["-q", "train", str(recipe), "train.steps=2", "train.eval_every=2"]) == 0
    assert made and (root / "dataset.json").is_file()
    assert [p.name for p in root.parent.iterdir()] == ["Dataset900_CTPhantom"]  # no temp leftovers


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "samtune", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "evaluate", "validate", "demo-data", "recipe-keys"):
        assert command in out
    for command in ("train", "evaluate", "validate", "demo-data"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0


def test_recipe_keys_table_matches_docs(capsys):
    assert main(["recipe-keys"]) == 0
    table = capsys.readouterr().out.strip()
    page = (Path(__file__).parents[2] / "docs" / "reference" / "recipe_keys.md").read_text()
    documented = page.split("<!-- recipe-keys:start -->\n")[1].split("\n<!-- recipe-keys:end -->")[0]
    assert documented == table, (
        "docs/reference/recipe_keys.md is out of date: paste the output of `samtune recipe-keys` between its markers"
    )


@pytest.mark.parametrize("fmt, out_name, files", [
    ("hf", "hf", ["config.json", "model.safetensors"]),
    ("sam-pth", "organ_sam.pth", None),
    ("onnx", "onnx", ["image_encoder.onnx", "prompt_decoder.onnx"]),
])  # fmt: skip
def test_export_command_writes_the_format(ct_run, tmp_path, fmt, out_name, files):
    _, run = ct_run
    out = tmp_path / out_name
    assert main(["-q", "export", "--checkpoint", str(run / "checkpoints" / "best"), "--format", fmt, "--out", str(out)]) == 0
    if files is None:
        assert out.is_file() and "image_encoder.patch_embed.proj.weight" in torch.load(out, weights_only=True)
    else:
        assert sorted(p.name for p in out.iterdir()) == files


def test_decoder_only_mode_trains_and_evaluates(tmp_path):
    root = generate_ct_phantom(tmp_path / "data", n_cases=3, shape=(48, 48, 12))
    data = {"kind": "nifti", "root": str(root), "val_fraction": 0.34}
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run")
    overrides = ["train.mode=decoder_only", "train.steps=4", "train.eval_every=4"]
    assert main(["-q", "train", str(recipe), *overrides]) == 0
    last = tmp_path / "run" / "checkpoints" / "last"
    assert {"config.json", "model.safetensors", "recipe.yaml", "trainer_state.json"} <= {p.name for p in last.iterdir()}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["mask_decoder"] > 0
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", str(recipe), *overrides, "--checkpoint", str(last), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["miou"] == pytest.approx(metrics["miou"], abs=1e-9)


def test_overrides_may_follow_options(ct_run, tmp_path):
    recipe, run = ct_run
    out = tmp_path / "e.json"
    args = ["-q", "evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "last"), "--out", str(out), "eval.max_samples=5"]
    assert main(args) == 0
    assert json.loads(out.read_text())["prompted"]["n_samples"] == 5
    with pytest.raises(SystemExit):
        main(["evaluate", str(recipe), "--checkpoint", str(run), "--no-such-option"])


def test_bf16_autocast_and_corrective_rounds_run(tmp_path):
    root = generate_ct_phantom(tmp_path / "data", n_cases=3, shape=(48, 48, 12))
    data = {"kind": "nifti", "root": str(root), "val_fraction": 0.34}
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run")
    overrides = ["train.precision=bf16", "train.steps=2", "train.eval_every=2", "prompts.corrective_rounds=2",
                 "prompts.box_probability=0.5", "prompts.per_image=2", "eval.max_samples=8"]  # fmt: skip
    assert main(["-q", "train", str(recipe), *overrides]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    prompted = metrics["prompted"]
    assert [r["round"] for r in prompted["by_round"]] == [0, 1, 2] and prompted["rounds"] == 3
    assert all(math.isfinite(r["miou"]) for r in prompted["by_round"])
    out = tmp_path / "eval.json"  # evaluate applies the same precision, prompts and rounds
    last = tmp_path / "run" / "checkpoints" / "last"
    assert main(["-q", "evaluate", str(recipe), *overrides, "--checkpoint", str(last), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["prompted"]["by_round"] == prompted["by_round"]


def test_every_command_has_a_handler_and_help_needs_no_torch():
    from samtune.finetune import cli, commands

    names = cli.command_names()
    assert names == list(commands.COMMANDS) and names[0] == "train" and names[-1] == "recipe-keys"
    for command in names:
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
    recipe = Path(__file__).parents[2] / "recipes" / "demo.yaml"
    code = (
        "import contextlib, io, sys\nfrom samtune.finetune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['recipe-keys']) == 0 and main(['validate', {str(recipe)!r}]) == 0\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
