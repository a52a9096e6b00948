"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtune.datasets.cityscapes import map_label_ids
from samtune.datasets.source import SliceSource
from samtune.datasets.synthetic import generate_cityscapes, generate_ct_phantom


@pytest.fixture(scope="session")
def phantom_template(tmp_path_factory) -> Path:
    """A small CT phantom dataset (nnU-Net v2 layout, 3 cases of 48×48×12), generated once."""
    return generate_ct_phantom(tmp_path_factory.mktemp("ct"), n_cases=3, shape=(48, 48, 12))


@pytest.fixture
def phantom(phantom_template, tmp_path) -> Path:
    """A private copy of the phantom dataset that a test may modify."""
    root = tmp_path / phantom_template.name
    shutil.copytree(phantom_template, root)
    return root


@pytest.fixture(scope="session")
def cs_template(tmp_path_factory) -> Path:
    """A small Cityscapes-style tree (2 train images in 2 cities, 1 val, 128×64), generated once."""
    return generate_cityscapes(tmp_path_factory.mktemp("cs") / "cityscapes", n_train=2, n_val=1, size_wh=(128, 64))


@pytest.fixture
def cs_root(cs_template, tmp_path) -> Path:
    """A private copy of the Cityscapes-style tree that a test may modify."""
    root = tmp_path / "cityscapes"
    shutil.copytree(cs_template, root)
    return root


@pytest.fixture(scope="session")
def bdd_template(tmp_path_factory) -> Path:
    """A small BDD100K-style tree (images/10k + labels/sem_seg/masks, 2 train + 1 val, 128×64), generated once."""
    from samtune.datasets.driving_demo import generate_bdd100k

    return generate_bdd100k(tmp_path_factory.mktemp("bdd") / "bdd100k", n_train=2, n_val=1, size_wh=(128, 64))


@pytest.fixture
def bdd_root(bdd_template, tmp_path) -> Path:
    """A private copy of the BDD100K-style tree that a test may modify."""
    return Path(shutil.copytree(bdd_template, tmp_path / "bdd100k"))


@pytest.fixture(scope="session")
def acdc_template(tmp_path_factory) -> Path:
    """A small ACDC-style tree (rgb_anon + gt, 1 train + 1 val image per condition, 128×64), generated once."""
    from samtune.datasets.driving_demo import generate_acdc

    return generate_acdc(tmp_path_factory.mktemp("acdc") / "acdc", size_wh=(128, 64))


@pytest.fixture
def acdc_root(acdc_template, tmp_path) -> Path:
    """A private copy of the ACDC-style tree that a test may modify."""
    return Path(shutil.copytree(acdc_template, tmp_path / "acdc"))


@pytest.fixture(scope="session")
def mapillary_template(tmp_path_factory) -> Path:
    """A small Mapillary Vistas-style tree (v2.0 labels + a generated config_v2.0.json, 2 training + 2 validation, 128×64), generated once."""
    from samtune.datasets.driving_demo import generate_mapillary

    return generate_mapillary(tmp_path_factory.mktemp("vistas") / "mapillary", n_train=2, n_val=2, size_wh=(128, 64))


@pytest.fixture
def mapillary_root(mapillary_template, tmp_path) -> Path:
    """A private copy of the Mapillary Vistas-style tree that a test may modify."""
    return Path(shutil.copytree(mapillary_template, tmp_path / "mapillary"))


@pytest.fixture(scope="session")
def coco_template(tmp_path_factory) -> Path:
    """The COCO demo tree (annotations/instances_{train,val}2017.json + images, 6 + 3 of 128×96), generated once."""
    pytest.importorskip("pycocotools")
    from samtune.datasets.coco_demo import generate_coco

    return generate_coco(tmp_path_factory.mktemp("coco") / "coco")


@pytest.fixture
def coco_root(coco_template, tmp_path) -> Path:
    """A private copy of the COCO demo tree that a test may modify."""
    return Path(shutil.copytree(coco_template, tmp_path / "coco"))


@pytest.fixture(scope="session")
def dicom_template(tmp_path_factory) -> Path:
    """The CT phantom as a small DICOM export (3 patients of 48×48×12: CT series + DICOM-SEG), generated once."""
    from samtune.datasets.dicom_demo import generate_dicom_phantom

    return generate_dicom_phantom(tmp_path_factory.mktemp("dicom"), n_cases=3, shape=(48, 48, 12))


@pytest.fixture
def dicom_root(dicom_template, tmp_path) -> Path:
    """A private copy of the DICOM export (its conversion cache is written inside it)."""
    root = tmp_path / dicom_template.name
    shutil.copytree(dicom_template, root)
    return root


def two_blobs() -> np.ndarray:
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True  # 100 px
    mask[25:30, 25:37] = True  # 60 px
    return mask


class BlobSource(SliceSource):
    """Two 40×40 images, each with two blobs of class 1 (100 and 60 px) and a bar of class 2."""

    class_names = {1: "blob", 2: "bar"}
    ignore_index = 255

    def __init__(self):
        self.label = np.zeros((40, 40), np.uint8)
        self.label[two_blobs()] = 1
        self.label[32:38, 2:20] = 2

    def __len__(self):
        return 2

    def item_id(self, i):
        return f"img{i}"

    def slice_classes(self, i):
        ids, counts = np.unique(self.label, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def load(self, i):
        image = np.full((40, 40, 3), 60, np.uint8)
        image[self.label > 0] = 200
        return image, self.label.copy()


@pytest.fixture
def blob_source() -> type[BlobSource]:
    """The ``BlobSource`` class (tests subclass it to count loads or add a slice index)."""
    return BlobSource


@pytest.fixture
def write_train_ids():
    """Writes ``*_gtFine_labelTrainIds.png`` beside every labelIds file of a tree, as
    cityscapesScripts' createTrainIdLabelImgs does (from the official table); returns the files."""

    def write(root: Path) -> list[Path]:
        written = []
        for label_ids in sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png")):
            train_ids = label_ids.with_name(label_ids.name.replace("_labelIds", "_labelTrainIds"))
            Image.fromarray(map_label_ids(np.asarray(Image.open(label_ids)))).save(train_ids)
            written.append(train_ids)
        return written

    return write


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs (``pytestmark = pytest.mark.usefixtures(...)``): the
    tiny model's tensors gain nothing from a second one, and with other processes on the cores two
    threads made the prediction tests 3-6× slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_run(folder: Path, data: dict, space, *, task: str = "both", tokens: int = 2) -> Path:
    """A run folder with one untrained checkpoint (checkpoints/best), as `samtune train` writes it."""
    import yaml

    from samtune.adapters.lora import prepare_trainable
    from samtune.finetune.checkpoints import save_checkpoint
    from samtune.finetune.recipe import dump_recipe, load_recipe
    from samtune.finetune.runtime import build_base_model, model_family

    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "seed": 0, "task": task, "data": data, "model": {"name": "tiny", "image_size": 64},
        "eval": {"batch_size": 8}, "output": {"dir": str(folder / "run")},
    }))  # fmt: skip
    recipe = load_recipe(recipe_file)
    family, base = model_family(recipe), build_base_model(recipe)
    if tokens:
        family.add_class_prompts(base, len(space.ids), tokens)
    model = prepare_trainable(base, family, "lora", recipe.adapter.lora)
    classes = {"task": task, "tokens": tokens, "label_space": space.to_dict()}
    save_checkpoint(model, folder / "run" / "checkpoints" / "best", dump_recipe(recipe), {"step": 0}, classes=classes)
    return folder / "run"


@pytest.fixture(scope="session")
def make_run():
    """``make_run(folder, data_section, label_space, task=, tokens=)`` -> a run folder holding one
    untrained checkpoint (no training: files, headers and geometry are what prediction tests check)."""
    return _make_run


def _official_args(ev, export_file: Path, predictions: Path | None = None):
    args = ev.CArgs()
    vars(args).update(vars(ev.args))  # the module's defaults, on a copy (the module object is global)
    args.evalInstLevelScore = False  # nIoU: needs *_instanceIds.png and avgClassSize
    args.evalPixelAccuracy = False  # its np.in1d is gone from NumPy 2.4
    args.JSONOutput = False
    args.exportFile = str(export_file)
    args.quiet = True
    args.colorized = False
    args.bold = args.nocol = ""
    if predictions is not None:
        args.predictionPath = str(predictions)  # getPrediction: found by {city}_{seq}_{frame}*.png
        args.predictionWalk = None
    return args


@pytest.fixture(scope="session")
def official_cityscapes_args():
    """``official_cityscapes_args(ev, export_file, predictions=None)``: the ``args`` object the
    official evaluator (cityscapesscripts' evalPixelLevelSemanticLabeling ``ev``) reads, set up
    for a quiet, pixel-level-only run."""
    return _official_args


def _same_as_official(ours: dict, theirs: dict, ev) -> list[str]:
    """Assert that a ConfusionAccumulator result equals the official evaluator's: per-class IoU to
    1e-6 (NaN on both sides where the official is NaN), TP/FP/FN from its labelId confusion
    matrix, the class mean and the pixel accuracy. Returns the classes that are NaN."""
    import math

    from samtune.datasets.cityscapes import CLASS_NAMES, TRAIN_CLASSES

    conf = np.asarray(theirs["confMatrix"], dtype=np.int64)  # labelIds 0..33, rows ground truth
    evaluated = [label.id for label in ev.labels if label.id >= 0 and not label.ignoreInEval]
    assert sorted(evaluated) == sorted(lid for _, lid in TRAIN_CLASSES)
    assert list(ours["per_class"]) == list(CLASS_NAMES.values())  # the official names ("traffic light", ...)
    nan_classes = []
    for name in CLASS_NAMES.values():
        official, got = theirs["classScores"][name], ours["per_class"][name]
        if math.isnan(official):
            assert math.isnan(got["iou"]), name
            nan_classes.append(name)
        else:
            assert got["iou"] == pytest.approx(official, abs=1e-6), name
        lid = ev.name2label[name].id
        tp = int(conf[lid, lid])
        fn = int(conf[lid].sum()) - tp
        fp = int(conf[[e for e in evaluated if e != lid], lid].sum())
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn), name
    assert ours["miou"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
    kept = conf[evaluated]
    assert ours["pixel_accuracy"] == pytest.approx(kept[:, evaluated].trace() / kept.sum(), abs=1e-9)
    return nan_classes


@pytest.fixture
def official_instance_evaluator(monkeypatch, tmp_path):
    """``official_instance_evaluator(prediction_folder, gt_instance_files)`` -> the result dict of
    cityscapesScripts' evalInstanceLevelSemanticLabeling.evaluateImgLists, each ground truth's
    prediction text file found by its own getPrediction; quiet, its caches in ``tmp_path``."""
    import json
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling")
    if not hasattr(ev.np, "in1d"):  # removed in NumPy 2.4; in1d(a, b) was isin(a, b).ravel()
        monkeypatch.setattr(ev.np, "in1d", lambda a, b: np.isin(a, b).ravel(), raising=False)
    monkeypatch.chdir(tmp_path)  # it writes matches.json into the working directory

    def write_json(data, path):  # its writer fails on the NumPy integers NumPy 2 counts return
        Path(path).write_text(json.dumps(data, default=lambda o: o.item() if hasattr(o, "item") else o.__dict__))
    monkeypatch.setattr(ev, "writeDict2JSON", write_json)

    def run(predictions, gt_files):
        args = ev.CArgs()
        vars(args).update(vars(ev.args))
        args.predictionPath, args.predictionWalk = str(predictions), None
        args.gtInstancesFile = str(tmp_path / "gtInstances.json")  # its cache of the ground truth
        args.JSONOutput, args.quiet, args.colorized = False, True, False
        pred_files = [ev.getPrediction(str(gt), args) for gt in gt_files]
        return ev.evaluateImgLists(pred_files, [str(gt) for gt in gt_files], args)

    return run


@pytest.fixture(scope="session")
def same_as_official():
    """``same_as_official(ours, theirs, ev)``: our semantic scores against cityscapesScripts'."""
    return _same_as_official


@pytest.fixture(scope="session")
def both_task_run(phantom_template, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run folder) of a finished 2-step task-both run with one corrective round on 2
    validation cases (so best and worst differ), for the report tests; do not modify."""
    import yaml

    from samtune.finetune.cli import main

    tmp = tmp_path_factory.mktemp("both_run")
    shutil.copytree(phantom_template, tmp / "data")
    recipe = {
        "seed": 0, "task": "both", "data": {"kind": "nifti", "root": str(tmp / "data"), "val_fraction": 0.67},
        "model": {"name": "tiny", "image_size": 64},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 2, "log_every": 2, "image_every": 0},
        "prompts": {"corrective_rounds": 1}, "eval": {"batch_size": 8, "max_samples": 12},
        "output": {"dir": str(tmp / "run")},
    }  # fmt: skip
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["-q", "train", str(tmp / "recipe.yaml")]) == 0
    return tmp / "recipe.yaml", tmp / "run"


@pytest.fixture
def tracked_slices():
    """A function ``(tracker, model, family, transform, prompted=1) -> (tracker masks by slice,
    image-model mask)``: a memory tracker (``make_propagator("memory", ...)``) run through a random
    4-slice volume from one box on slice ``prompted``, its low-res masks recorded per slice, and
    what the image model's ``decode_prompts`` gives for the same box on that slice. The prompted
    slice of a tracker holding the image model's weights must equal the latter."""
    import torch

    from samtune.finetune.predict.propagation import SlicePrompt, pixels, prompt_in_input

    def run(tracker, model, family, transform, prompted: int = 1):
        outputs, forward = {}, tracker.video_model.forward

        def spy(*args, **kwargs):
            out = forward(*args, **kwargs)
            outputs.setdefault(kwargs["frame_idx"], out.pred_masks.clone())
            return out

        tracker.video_model.forward = spy
        slices = np.random.default_rng(1).integers(0, 255, (4, 48, 40), dtype=np.uint8)
        box = np.array([8.0, 10, 30, 40])
        tracker(lambda z: slices[z], 4, SlicePrompt(prompted, box=box))
        box_in, _ = prompt_in_input(transform, (48, 40), box, None)
        with torch.no_grad():
            embeddings = family.encode_images(model, pixels(transform, slices[prompted])[None])
            low_res, _ = family.decode_prompts(model, embeddings, torch.tensor(box_in[None], dtype=torch.float32))
        return {z: m[0] for z, m in outputs.items()}, low_res[0]

    return run
