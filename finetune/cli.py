"""The ``samtune`` command line: one verb per job, every recipe key overridable as key.path=value.

Each command has a parser here (``_add_<command>``, called by ``build_parser`` in ``_PARSERS`` order)
and a handler in ``samtune.finetune.commands`` (``COMMANDS``), where ``_run`` dispatches. Heavy
modules (torch, transformers) are imported inside the handlers only, so ``--help``, ``validate`` and
``recipe-keys`` never load them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from samtune import SamtuneError, __version__

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

OVERRIDES_HELP = "recipe overrides, e.g. train.steps=200 train.lr=3e-4 output.dir=runs/try2 (see `samtune recipe-keys`)"
DEVICE_HELP = "auto (CUDA when available), cpu, cuda, cuda:N"
PREDICT_PRECISIONS = ("auto", "fp32", "bf16", "int8")  # samtune.finetune.predict.prediction.PRECISIONS (tested equal; no torch here)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML file, e.g. recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help=OVERRIDES_HELP)


# --- one parser per command ---------------------------------------------------------------------------------------


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune with a recipe; writes checkpoints, metrics.json, TensorBoard logs",
        description="Fine-tune SAM as the recipe says. Writes OUTPUT/recipe.yaml, OUTPUT/checkpoints/{last,best}/ "
        "(peft adapter folders), OUTPUT/metrics.json and OUTPUT/tensorboard/, and prints per-class IoU "
        "before and after fine-tuning on the validation split.",
    )
    _add_recipe_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue a run exactly where its last training state (OUTPUT/states/, every train.save_every steps) "
                   "left it; DIR: a state folder or another run folder (default: this recipe's output.dir)")  # fmt: skip
    p.add_argument("--resume-force", action="store_true", help="resume although keys that cannot change results differ "
                   "(train.eval_every, log_every, save_every, keep_states, num_workers, output.dir)")  # fmt: skip


def _add_evaluate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on the recipe's validation split",
        description="Rebuild the recipe's base model, load an adapter folder written by `samtune train` and "
        "report per-class IoU/Dice on the validation split: prompted (box or point prompts from the ground truth) and, "
        "for task automatic/both, semantic (full label maps, every pixel; NIfTI: per-case 3D Dice/HD95/NSD and "
        "per_case.csv). eval.save_predictions=true also writes the label maps.",
    )
    _add_recipe_args(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="adapter folder, e.g. runs/demo/checkpoints/best")
    p.add_argument("--out", type=Path, default=None, help="metrics JSON to write (default: OUTPUT/eval/metrics.json)")


def _add_predict(sub: Subparsers) -> None:
    p = sub.add_parser(
        "predict",
        help="apply a checkpoint to new scans/images: label NIfTI on the scan's grid, class-index PNG + overlay",
        description="Predict label maps of new inputs with no labels. Automatic mode (every class, no input) when the "
        "checkpoint has it; with --prompts, boxes/points per class from a JSON file (a prompt on one slice of a volume is "
        "propagated through it). Volumes (.nii/.nii.gz, any orientation, NIfTI-1/2; 4D: data.channel; or a folder of "
        "DICOM series) -> OUT/<name>.nii.gz with exactly the scan's shape, affine and sform/qform, OUT/<name>.json (class "
        "names, voxels, mL), OUT/<name>.ctbl and OUT/<name>_itksnap.txt (class names and colours for 3D Slicer and "
        "ITK-SNAP); DICOM inputs also OUT/<name>.seg.dcm (DICOM-SEG). Images "
        "(PNG/JPEG/TIFF) -> OUT/<name>.png (class values at the original size; Cityscapes: labelIds) and "
        "OUT/<name>_overlay.png. The recipe is read from the checkpoint.",
        epilog='Prompts file: {"coordinates": "voxel" | "RAS" | "LPS" | "pixel", "prompts": [{"class": "liver", '
        '"box": [[i0, j0, k], [i1, j1, k]]}, {"class": "spleen", "points": [[i, j, k]], "labels": [1], "input": "case_01"}]} '
        "(volumes: voxel indices of the file or world mm; images: pixel [x0, y0, x1, y1] and [x, y]).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run folder written by `samtune train`")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, folders or (quoted) globs")
    p.add_argument("--out", type=Path, required=True, help="folder for the predictions")
    p.add_argument("--prompts", type=Path, default=None, help="JSON of boxes/points per class (see below); default: automatic mode")
    p.add_argument("--recipe", type=Path, default=None, help="recipe to use instead of CHECKPOINT/recipe.yaml")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--series", default=None, metavar="UID", help="DICOM: the SeriesInstanceUID to read where an --input folder holds several image series (they are listed when it is missing)")
    p.add_argument("--output-format", choices=["nifti", "dicom-seg", "both"], default=None,
                   help="DICOM inputs: NIfTI label, DICOM-SEG referencing the series (OUT/<name>.seg.dcm), or both (default for DICOM; NIfTI inputs: nifti)")  # fmt: skip
    p.add_argument("--seg-type", choices=["BINARY", "LABELMAP"], default="BINARY",
                   help="DICOM-SEG segmentation type: BINARY (one bit plane per segment and slice; read by every viewer) or LABELMAP (one frame per slice holding segment numbers; DICOM 2024 and later)")  # fmt: skip
    p.add_argument("--resample", action="store_true", help="DICOM: interpolate a tilted, gappy or unevenly spaced series onto a regular grid instead of refusing it (NIfTI output only)")
    p.add_argument("--precision", choices=PREDICT_PRECISIONS, default=None,
                   help="the model's arithmetic: auto (bf16 where the device multiplies bfloat16 natively, else fp32), fp32, bf16, or int8 "
                   "(the image encoder's Linear layers quantised; CPU only); default: the recipe's train.precision. bf16 and int8 "
                   "change the labels slightly (speed and agreement with fp32: docs/howto/predict.md)")  # fmt: skip
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                   help="what runs the image encoder and the class decoder: torch, or onnxruntime (CPU, float32; about 2x faster for "
                   "MobileSAM on a CPU; traced once per checkpoint into ~/.cache/samtune/onnx or $SAMTUNE_CACHE/onnx; needs the onnx extra)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="slices/images per model call (default: the recipe's eval.batch_size); "
                   "on a 2-core CPU 4 was faster than 16 (the activations stay in cache); the labels do not depend on it")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads of torch (default: one per core); on a CPU shared with "
                   "other jobs 1 can be several times faster")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides, e.g. automatic.threshold=0.6 eval.batch_size=4 data.channel=1")


def _add_validate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "validate",
        help="check a recipe (and that its data folder exists) without training",
        description="Validate a recipe against the schema, report every problem at once, print the resolved recipe.",
    )
    _add_recipe_args(p)


def _add_demo_data(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo-data",
        help="generate the synthetic demo datasets (CT phantom as NIfTI or DICOM, Cityscapes-style)",
        description="Write a synthetic CT phantom set in nnU-Net v2 layout (OUT/Dataset900_CTPhantom) and a "
        "synthetic Cityscapes-style tree (OUT/cityscapes). --kind dicom writes the same CT phantom as a PACS export "
        "(OUT/DicomCTPhantom/PHANTOM_000/CT: one DICOM file per slice; .../SEG: the ground truth as DICOM-SEG). "
        "Deterministic from --seed.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the datasets into")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--kind", choices=["all", "ct", "cityscapes", "dicom", "bdd100k", "acdc", "mapillary", "coco"], default="all",
                   help="which dataset(s) to write; all = ct and cityscapes (dicom takes a few seconds more); bdd100k, "
                   "acdc and mapillary: small trees in those datasets' layouts (OUT/bdd100k, OUT/acdc, OUT/mapillary); coco: a COCO instances tree "
                   "(OUT/coco: polygons, RLE, a crowd region)")


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser(
        "export",
        help="merge LoRA and export a checkpoint: Hugging Face folder, official SAM .pth, or ONNX",
        description="Merge the LoRA weights of a checkpoint into the base model and write it as a transformers "
        "folder (hf: SamModel.from_pretrained loads it), an official segment_anything .pth (sam-pth), or two ONNX "
        "files, image encoder and prompt encoder + mask decoder (onnx; needs the onnx extra).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder written by `samtune train`")
    p.add_argument("--format", choices=["hf", "sam-pth", "onnx"], required=True, help="what to write")
    p.add_argument("--out", type=Path, required=True, help="output folder (hf, onnx) or .pth file (sam-pth)")
    p.add_argument("--recipe", type=Path, default=None, help="recipe that built the base model (default: CHECKPOINT/recipe.yaml)")


def _add_inspect(sub: Subparsers) -> None:
    p = sub.add_parser(
        "inspect",
        help="report what the recipe's data holds (cases, slices, classes, spacing) and every problem",
        description="Read the recipe's dataset as training would (filling the NIfTI preprocessing cache), print "
        "cases/images, slices, classes with voxel (pixel) counts, spacing and orientation, and every problem "
        "(bad cases are listed, not fatal). Writes the report as JSON. Exit status 2 when there are problems.",
    )
    _add_recipe_args(p)
    p.add_argument("--out", type=Path, default=None, help="JSON report to write (default: OUTPUT/inspect.json)")


def _add_cache(sub: Subparsers) -> None:
    p = sub.add_parser(
        "cache",
        help="build the decoder_only embedding cache ahead of training, or --prune stale caches",
        description="Encode every training image of the recipe once with the frozen image encoder and store the "
        "embeddings, float16 and memory-mapped, in <cache dir>/embeddings-<key>/ (data.cache_dir, default "
        "<data.root>/.samtune_cache), as `samtune train` does with train.mode=decoder_only train.embedding_cache=true; "
        "prints where, how many entries and the size. --prune instead removes stale caches: embedding caches of this "
        "dataset and model whose key no longer matches (other weights, image size, split or files), and the NIfTI "
        "slice cache's entries and leftovers that no longer match.",
    )
    _add_recipe_args(p)
    p.add_argument("--prune", action="store_true", help="remove stale caches instead of building")


def _add_report(sub: Subparsers) -> None:
    p = sub.add_parser(
        "report",
        help="write one static HTML report of runs: tables, charts, best/worst cases (opens from disk, no network)",
        description="Write one HTML file (images embedded, no server or network needed) for one or more run folders "
        "written by `samtune train` (or metrics JSON files of `samtune evaluate`): each part's evaluation protocol, "
        "per-class IoU/Dice before and after fine-tuning (per-case 3D Dice/HD95/NSD for volumes), bar charts, learning "
        "curves, mIoU/mDice by prompt round, the best and worst validation cases predicted again from the best checkpoint, "
        "the recipe, parameter counts, skipped cases. Several runs: a comparison table first.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (output.dir of `samtune train`) or metrics JSON files")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: FIRST_RUN_DIR/report.html)")
    p.add_argument("--cases", type=int, default=4, metavar="N", help="best and worst validation cases shown per run (0: no montage)")
    p.add_argument("--max-samples", type=int, default=64, metavar="N", help="at most N validation samples predicted and scored per run")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def _add_fastsam(sub: Subparsers) -> None:
    p = sub.add_parser(
        "fastsam",
        help="fine-tune FastSAM (YOLOv8-seg, optional extra) on the recipe's data and score it like the semantic evaluation",
        description="FastSAM beside SAM + LoRA: export the recipe's train/validation data in YOLO segmentation format "
        "(OUT/yolo_data/), train FastSAM on the recipe's classes with Ultralytics' trainer (OUT/train/) and score it on every "
        "validation image/slice with samtune's semantic metrics (OUT/metrics.json). Needs pip install \"samtune[fastsam]\" "
        "(ultralytics + torchvision, which replace torch by the release torchvision needs: use a separate environment); "
        "--export-only needs nothing extra.",
    )
    _add_recipe_args(p)
    p.add_argument("--weights", default="FastSAM-s.pt", help="FastSAM checkpoint (FastSAM-s.pt, FastSAM-x.pt) or a model YAML for random init (yolov8n-seg.yaml)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: OUTPUT/fastsam)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the recipe's model.image_size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--conf", type=float, default=0.25, help="confidence threshold of predicted instances in the evaluation")
    p.add_argument("--device", default="cpu", help="cpu, 0 (first GPU), ...: Ultralytics' device string")
    p.add_argument("--export-only", action="store_true", help="only write the YOLO-format data (no ultralytics needed)")


def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint to 3D Slicer and OHIF (MONAI Label's REST protocol): automatic proposal, click corrections, labels, retraining",
        description="Serve a checkpoint through the part of MONAI Label's REST API that 3D Slicer's MONAI Label module and OHIF's "
        "MONAI Label extension use. Models: `auto` (every class, no input) and `clicks` (foreground/background clicks correcting "
        "one class, starting from the automatic proposal). The studies folder is the datastore, laid out as an nnU-Net v2 "
        "dataset (imagesTr/{id}_0000.nii.gz, labelsTr/{id}.nii.gz, dataset.json written from the checkpoint's classes), so saved "
        "labels are training data: POST /train/ retrains on them. Listens on 127.0.0.1 unless --host says otherwise.",
        epilog="3D Slicer: Extensions Manager -> MONAI Label; in the module, server http://127.0.0.1:8000 (with --token: log in with "
        "any user name and the token as password). Docs: docs/howto/serve.md",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run folder written by `samtune train`")
    p.add_argument("--studies", type=Path, required=True, help="folder of images and labels (created when missing)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, use --token)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000, MONAI Label's)")
    p.add_argument("--token", default=None, help="bearer token every route but /info/ requires (default: $SAMTUNE_SERVE_TOKEN; none: no auth)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--max-upload-mb", type=int, default=2048, help="largest accepted upload in MiB (default 2048)")
    p.add_argument("--session-expiry", type=int, default=3600, metavar="SECONDS", help="remove a session unused for this long (default 3600)")


def _add_recipe_keys(sub: Subparsers) -> None:
    sub.add_parser("recipe-keys", help="print every recipe key with its default and meaning (Markdown)")


# the order of `samtune --help`
_PARSERS: tuple[Callable[[Subparsers], None], ...] = (
    _add_train, _add_evaluate, _add_predict, _add_validate, _add_demo_data, _add_export,
    _add_inspect, _add_cache, _add_report, _add_serve, _add_fastsam, _add_recipe_keys,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtune",
        description="Fine-tune Segment Anything (SAM) on one domain: LoRA on the frozen image encoder, "
        "trained mask decoder, prompts sampled from the ground truth.",
        epilog="Start with: samtune train recipes/demo.yaml   (generates demo data, trains, evaluates)",
    )
    parser.add_argument("--version", action="version", version=f"samtune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on the log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _PARSERS:
        add(sub)
    return parser


def command_names() -> list[str]:
    """The subcommands of :func:`build_parser`, in the order ``samtune --help`` lists them."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


# --- one handler per command: each returns the exit status; heavy imports stay inside -----------------------------


def _run(args: argparse.Namespace) -> int:
    from samtune.finetune.commands import COMMANDS

    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may also follow options (`evaluate R.yaml --checkpoint D eval.max_samples=50`)
    args, extras = parser.parse_known_args(argv)
    if extras:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = list(args.overrides) + extras
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("transformers", "peft", "PIL", "matplotlib", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="peft")
    # transformers' own deprecation notices (raised inside peft/transformers, nothing a user can act on)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*trace might not generalize.*")  # ONNX export of fixed-size shapes
    try:
        return _run(args)
    except SamtuneError as exc:
        print(f"samtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("samtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
