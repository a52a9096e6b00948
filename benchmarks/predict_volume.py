"""A whole CT through ``samtune predict`` (automatic mode), end to end: seconds and peak memory.

Each row is one ``samtune predict --checkpoint CKPT --input ct.nii.gz --out OUT`` in its own
process (read the NIfTI, window, encode every slice, decode all class prompts, fuse, write the
label NIfTI + its JSON/colour tables), timed from the outside (wall seconds, including Python start
and imports) and in CPU seconds, with its peak resident memory (``ru_maxrss`` of that one child, read by a small
wrapper process per row, so rows do not see each other's peaks). One predict runs at a time.

Input: a generated 512×512×300 int16 CT (``--size``, ``--slices``), 0.8×0.8×1.5 mm, air outside a
body ellipse, soft tissue with noise, liver/spleen/kidney/spine blobs in HU, written with nibabel
as .nii.gz. Checkpoints (four classes, ``task: both``, two tokens per class prompt):

- ``demo``: the checkpoint ``samtune train recipes/demo.yaml`` writes (``tiny-pretrained`` at
  128 px; ``--demo-checkpoint``, default runs/demo; the row is skipped with a note if missing).
- ``mobile_sam``: ``mobile-sam`` (TinyViT-5M) at ``--image-size`` px (default ``--size``), random
  weights written as an official ``mobile_sam.pt`` (``MobileSamFamily.export(..., "sam-pth")``),
  the recipe's ``model.checkpoint`` pointing at it, as a user's recipe does.
- ``vit_b``: ``sam-vit-base`` at ``--image-size`` px, random weights saved as a Hugging Face folder
  at 1024 px (like facebook/sam-vit-base; ``model.checkpoint`` points at it, resized on load).

For both, the checkpoint is what ``samtune train`` would save before its first step (as
tests/conftest.py ``_make_run`` builds it): the recipe's base model (``build_base_model``) + class
prompts + LoRA (``prepare_trainable``), written by ``save_checkpoint`` with recipe.yaml and
classes.json. Time depends on shapes, not values: random weights cost what trained ones do.

Each model runs once per ``--precisions`` value (``samtune predict --precision``; default ``auto``,
the default of ``samtune predict``: fp32 on a CPU without native bfloat16); every precision after
the first also gets the per-class Dice of its labels against the first's (``--precisions fp32 int8
bf16``: what int8 and bf16 change). ``--air-slices N`` makes N slices at each end air only (one
value after windowing: ``samtune predict`` runs the model once for all of them); ``--input`` predicts
a given scan instead (e.g. a demo phantom case, where the demo checkpoint is trained).
``--engines torch onnxruntime`` adds rows with ``samtune predict --engine onnxruntime`` (float32 only,
so with the fp32/auto precisions only), Dice against the first row like the precisions; before its
rows, the graphs are traced into a fresh cache by a predict of a 2-slice CT ("trace" line: what
the first prediction with a new checkpoint costs once).

Goals of issue 20: MobileSAM ≤ 60 s, ViT-B ≤ 240 s, peak ≤ 4 GB for the 512×512×300 CT on the CPU
(figures and levers: docs/howto/predict.md, "A whole CT on the CPU").

    .venv/bin/python benchmarks/predict_volume.py --slices 8 --size 128              # quick check
    .venv/bin/python benchmarks/predict_volume.py --models mobile_sam                 # 512×512×300, MobileSAM
    .venv/bin/python benchmarks/predict_volume.py --models demo mobile_sam --precisions auto int8
    .venv/bin/python benchmarks/predict_volume.py --models demo --precisions fp32 int8 bf16 \
        --input demo_data/Dataset900_CTPhantom/imagesTr/phantom_000_0000.nii.gz      # Dice on the demo phantom
    .venv/bin/python benchmarks/predict_volume.py                                      # all three rows
    python benchmarks/predict_volume.py --device cuda                                  # on a GPU

Last line: ``RESULT mobile_sam_<px>_s=<s> vit_b_<px>_s=<s> demo_s=<s> <row>_peak_gib=<GiB>
<row>_<precision>_s=<s> <row>_<precision>_dice_min=<lowest class Dice vs the first precision> ...``
(rows not run or skipped are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers asks peft a deprecated question
warnings.filterwarnings("ignore", message="Could not find a config file")  # peft, on a base that is a .pt file

import numpy as np

MODELS = ("demo", "mobile_sam", "vit_b")
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # samtune predict --precision
ENGINES = ("torch", "onnxruntime")  # samtune predict --engine
VARIANTS = {"mobile_sam": "mobile-sam", "vit_b": "sam-vit-base"}
CLASSES = ["liver", "spleen", "kidney_right", "kidney_left"]
TOKENS = 2  # automatic.tokens default
SPACING = (0.8, 0.8, 1.5)  # mm
WINDOW_HU = [-160, 240]  # recipes/demo.yaml: abdomen soft tissue
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")
GOALS = {"mobile_sam": 60.0, "vit_b": 240.0}  # seconds, issue 20 (512×512×300 on the CPU)
GOAL_PEAK_GB = 4.0

# Runs one command and prints its wall seconds, CPU seconds (user + system) and ru_maxrss (KiB on Linux) as JSON on stderr's
# last line: a process of its own per row, so RUSAGE_CHILDREN holds that row's child only.
WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}), file=sys.stderr)
"""


# ------------------------------------------------------------------ machine
def cpu_description() -> tuple[str, dict[str, bool]]:
    """(CPU model name from lscpu, {flag: present}) for the flags matmul kernels care about."""
    name, flags = platform.processor() or "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                name = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    if not flags and Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    return name, {flag: flag in flags for flag in FLAGS}


# ------------------------------------------------------------------ input
def write_ct(path: Path, size: int, slices: int, seed: int = 0, air_slices: int = 0) -> None:
    """A size×size×slices int16 CT in HU: air, a body ellipse of soft tissue with noise, a spine and
    four organ ellipsoids whose extent varies along z; ``air_slices`` of them at each end hold air
    only (-1000 HU with noise: a scan that starts above and ends below the body)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size * 2 - 1
    body = (x / 0.86) ** 2 + (y / 0.62) ** 2 < 1
    spine = np.hypot(x, y - 0.4) < 0.09
    organs = [(-0.35, -0.05, 0.36, 0.45, 60.0), (0.5, -0.15, 0.17, 0.28, 50.0), (-0.28, 0.3, 0.12, 0.18, 150.0), (0.28, 0.3, 0.12, 0.18, 150.0)]
    data = np.empty((size, size, slices), np.int16)
    for z in range(slices):
        t = z / max(slices - 1, 1)
        hu = np.where(body, 40.0, -1000.0).astype(np.float32)
        hu[spine] = 400.0
        for i, (cx, cy, rx, ry, value) in enumerate(organs):
            scale = 0.6 + 0.4 * np.sin(np.pi * (0.2 + 0.6 * t + 0.1 * (i + 1)))
            hu[((x - cx) / (rx * scale)) ** 2 + ((y - cy) / (ry * scale)) ** 2 < 1] = value
        if z < air_slices or z >= slices - air_slices:
            hu = np.full_like(hu, -1000.0)
        hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
        data[:, :, z] = np.clip(hu, -1024, 3071).astype(np.int16).T  # NIfTI: i along x (columns)
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS-like radiological layout, as scanners write
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_data_dtype(np.int16)
    nib.save(image, str(path))


# ------------------------------------------------------------------ checkpoints
def random_base(model_key: str, folder: Path) -> Path:
    """Random weights for ``model_key`` written as a user has the real ones: mobile_sam.pt (official
    keys) for MobileSAM, a Hugging Face folder at 1024 px for ViT-B. Returns the path for
    ``model.checkpoint``."""
    import torch
    from transformers import SamModel

    sys.path.insert(0, str(Path(__file__).parent))
    from encoder_speed import sam_config

    from samtune.adapters.registry import family_of

    torch.manual_seed(0)
    if model_key == "mobile_sam":
        from samtune.adapters.mobile_sam import assemble, mobile_sam_config

        path = folder / "mobile_sam.pt"
        if not path.is_file():
            model = assemble(mobile_sam_config(1024))
            with torch.no_grad():
                model.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)  # as MobileSamFamily.build's random init
            family_of("mobile-sam").export(model.eval(), "sam-pth", path)
        return path
    path = folder / "sam-vit-base-random"
    if not (path / "model.safetensors").is_file():
        config = sam_config("vit_b", 1024)
        config.vision_config.initializer_range = 0.02  # transformers' 1e-10 default is for loaded weights
        model = SamModel(config)
        with torch.no_grad():
            model.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)  # as sam._init_random_sam
            torch.nn.init.trunc_normal_(model.vision_encoder.pos_embed, std=0.02)
        model.save_pretrained(str(path), safe_serialization=True)
    return path


def make_checkpoint(model_key: str, image_size: int, folder: Path, ct_folder: Path) -> Path:
    """A run folder with an untrained ``task: both`` checkpoint of ``model_key`` (as tests/conftest.py
    ``_make_run``): base model + class prompts + LoRA, saved by ``save_checkpoint``."""
    import yaml

    from samtune.adapters.lora import prepare_trainable
    from samtune.datasets.source import LabelSpace
    from samtune.finetune.checkpoints import save_checkpoint
    from samtune.finetune.recipe import dump_recipe, load_recipe
    from samtune.finetune.runtime import build_base_model, model_family

    run = folder / f"{model_key}_{image_size}"
    if (run / "checkpoints" / "best" / "adapter_model.safetensors").is_file():
        return run
    run.mkdir(parents=True, exist_ok=True)
    recipe_file = run / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "seed": 0, "task": "both",
        "data": {"kind": "nifti", "root": str(ct_folder), "window_hu": WINDOW_HU},
        "model": {"name": VARIANTS[model_key], "checkpoint": str(random_base(model_key, folder)), "image_size": image_size},
        "adapter": {"lora": {"rank": 4, "alpha": 4, "dropout": 0.0}},
        "output": {"dir": str(run)},
    }))  # fmt: skip
    recipe = load_recipe(recipe_file)
    family, base = model_family(recipe), build_base_model(recipe)
    family.add_class_prompts(base, len(CLASSES), TOKENS)
    model = prepare_trainable(base, family, "lora", recipe.adapter.lora)
    space = LabelSpace(list(range(1, len(CLASSES) + 1)), CLASSES, 0)
    classes = {"task": "both", "tokens": TOKENS, "label_space": space.to_dict()}
    save_checkpoint(model, run / "checkpoints" / "best", dump_recipe(recipe), {"step": 0}, classes=classes)
    return run


# ------------------------------------------------------------------ one predict
def samtune_command() -> list[str]:
    exe = Path(sys.executable).with_name("samtune")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "samtune"]


def run_predict(checkpoint: Path, ct: Path, out: Path, device: str, env: dict, log: Path, precision: str, options: list[str],
                engine: str = "torch") -> dict:
    """One ``samtune predict`` in a process of its own: wall seconds, peak RSS, return code."""
    command = [*samtune_command(), "predict", "--checkpoint", str(checkpoint), "--input", str(ct), "--out", str(out), "--device", device,
               "--precision", precision, "--engine", engine, *options]
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-c", WRAPPER, *command], stdout=handle, stderr=subprocess.PIPE, text=True, env=env)
    lines = done.stderr.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"rc": done.returncode, "wall": float("nan"), "cpu": float("nan"), "maxrss_kib": 0}
    with open(log, "a") as handle:
        handle.write("\n".join(lines[:-1]))
    result["command"] = " ".join(command)
    return result


def trace_onnx(checkpoint: Path, work: Path, args, env: dict) -> str:
    """Trace ``checkpoint``'s graphs into a fresh cache with a predict of a 2-slice CT; a line saying what it cost."""
    shutil.rmtree(Path(env["SAMTUNE_CACHE"]) / "onnx", ignore_errors=True)
    small = work / f"ct_{args.size}x{args.size}x2" / "ct.nii.gz"
    if not small.is_file():
        small.parent.mkdir(parents=True, exist_ok=True)
        write_ct(small, args.size, 2)
    out = work / "predictions" / "trace"
    shutil.rmtree(out, ignore_errors=True)
    r = run_predict(checkpoint, small, out, args.device, env, work / "trace.log", "fp32", [], "onnxruntime")
    return f"onnxruntime trace (once per checkpoint; a 2-slice predict that traces into a fresh cache): {r['wall']:.1f} s wall, rc {r['rc']}"


def check_output(label: Path, shape: tuple[int, ...]) -> str:
    """'' if the label file has the scan's shape, else what is wrong."""
    import nibabel as nib

    if not label.is_file():
        return f"no {label}"
    got = nib.load(str(label)).shape
    return "" if tuple(got) == tuple(shape) else f"label shape {got} != CT {shape}"


def dice_per_class(label: Path, reference: Path) -> dict[str, float]:
    """Dice of each class between two label files, by the class names of the label's JSON summary
    (1.0 where both lack the class)."""
    import nibabel as nib

    a, b = np.asarray(nib.load(str(label)).dataobj), np.asarray(nib.load(str(reference)).dataobj)
    classes = json.loads(label.with_name(label.name[: -len(".nii.gz")] + ".json").read_text())["classes"]  # {"1": "liver", ...}
    out = {}
    for value, name in classes.items():
        x, y = a == int(value), b == int(value)
        total = int(x.sum()) + int(y.sum())
        out[name] = 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total
    return out


def uniform_slices(ct: Path) -> int:
    """Slices that hold no HU above the window's low end: windowed to 0 everywhere, one model input for all."""
    import nibabel as nib

    data = np.asarray(nib.load(str(ct)).dataobj)
    return int((data.reshape(-1, data.shape[-1]) <= WINDOW_HU[0]).all(0).sum())


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="rows to run (default: all three)")
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=PRECISIONS,
                        help="samtune predict --precision of each row (default: auto, the default); every later one also gets "
                        "its per-class Dice against the first's labels")  # fmt: skip
    parser.add_argument("--engines", nargs="+", default=["torch"], choices=ENGINES,
                        help="samtune predict --engine of each row (default: torch); onnxruntime rows run the fp32/auto precisions only")
    parser.add_argument("--slices", type=int, default=300, help="slices of the generated CT (default 300)")
    parser.add_argument("--air-slices", type=int, default=0, help="slices of air only at each end of the generated CT (default 0)")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the generated CT, px (default 512)")
    parser.add_argument("--input", help="a NIfTI scan to predict instead of the generated CT (e.g. a demo phantom case); --slices/--size ignored")
    parser.add_argument("--image-size", type=int, help="model input size of mobile_sam and vit_b (default: --size); demo stays at its 128")
    parser.add_argument("--demo-checkpoint", default="runs/demo", help="run or checkpoint folder of `samtune train recipes/demo.yaml` (default runs/demo)")
    parser.add_argument("--threads", type=int, help="samtune predict --threads (and OMP_NUM_THREADS; default: torch's, one per core)")
    parser.add_argument("--batch-size", type=int, help="samtune predict --batch-size (default: the checkpoint's eval.batch_size)")
    parser.add_argument("--device", default="cpu", help="samtune predict --device: cpu (default), cuda, cuda:N, auto")
    parser.add_argument("--work", help="folder for the CT, checkpoints and predictions, reused when present (default: a temporary folder, removed)")
    args = parser.parse_args()
    image_size = args.image_size or args.size
    settings = [(e, p) for e in args.engines for p in args.precisions if e == "torch" or p in ("auto", "fp32")]
    if not settings:
        parser.error("--engines onnxruntime runs float32: give --precisions fp32 or auto with it")
    reference = settings[0][1] if settings[0][0] == "torch" else settings[0][0]

    import nibabel as nib
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    env = dict(os.environ, TQDM_DISABLE="1")
    env["SAMTUNE_CACHE"] = str(Path(args.work or tempfile.gettempdir()) / "samtune_cache")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    name, flags = cpu_description()
    print(f"CPU: {name}; {os.cpu_count()} cores; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; device {where}; load average {load_average()}")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="predict_volume_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        if args.input:
            ct = Path(args.input).resolve()
            ct_folder = ct.parent
        else:
            ct_folder = work / (f"ct_{args.size}x{args.size}x{args.slices}" + (f"_air{args.air_slices}" if args.air_slices else ""))
            ct_folder.mkdir(exist_ok=True)
            ct = ct_folder / "ct.nii.gz"
            if not ct.is_file():
                write_ct(ct, args.size, args.slices, air_slices=args.air_slices)
        shape = nib.load(str(ct)).shape[:3]
        depth = shape[2]
        print(f"input: {ct} ({'×'.join(map(str, shape))}, {ct.stat().st_size / 2**20:.0f} MiB; {uniform_slices(ct)} slices of air only; "
              f"ready in {time.perf_counter() - started:.1f} s)")  # fmt: skip

        checkpoints, notes = {}, {}
        for key in args.models:
            if key == "demo":
                demo = Path(args.demo_checkpoint)
                if demo.is_dir() and (any(demo.glob("checkpoints/*/classes.json")) or (demo / "classes.json").is_file()):
                    checkpoints[key] = demo
                else:
                    notes[key] = f"skipped: no demo checkpoint at {demo} (run `samtune train recipes/demo.yaml` or pass --demo-checkpoint)"
            else:
                started = time.perf_counter()
                checkpoints[key] = make_checkpoint(key, image_size, work / "checkpoints", ct_folder)
                print(f"checkpoint {key}: {checkpoints[key]} (built in {time.perf_counter() - started:.1f} s)")

        full = depth == 300 and shape[0] == 512 and not args.input
        print(f"\none `samtune predict` (automatic) per row, in its own process, one at a time; s = wall incl. start and imports; "
              f"CPU s = its user + system CPU time (wall/CPU s show contention); peak = max RSS of that process; goals (issue 20, 512×512×300 CPU): mobile_sam ≤ {GOALS['mobile_sam']:.0f} s, "
              f"vit_b ≤ {GOALS['vit_b']:.0f} s, peak ≤ {GOAL_PEAK_GB:g} GB; Dice: per class against the labels of the first setting ({reference})")  # fmt: skip
        print(f"{'model':<11} {'variant':<16} {'px':>5} {'precision':>11} {'slices':>6} {'s total':>8} {'s/slice':>8} {'CPU s':>8} {'peak GiB':>9} {'load':>5}  note")
        results, failed = [], False
        for key in args.models:
            variant = "tiny-pretrained" if key == "demo" else VARIANTS[key]
            px = 128 if key == "demo" else image_size
            if key not in checkpoints:
                print(f"{key:<11} {variant:<16} {px:>5} {'-':>11} {depth:>6} {'-':>8} {'-':>8} {'-':>8} {'-':>9} {'-':>5}  {notes[key]}")
                continue
            first_label = None
            if "onnxruntime" in args.engines:
                print(trace_onnx(checkpoints[key], work, args, env))
            for engine, precision in settings:
                name = precision if engine == "torch" else engine
                out = work / "predictions" / f"{key}_{name}"
                shutil.rmtree(out, ignore_errors=True)
                log = work / f"predict_{key}_{name}.log"
                load = os.getloadavg()[0]
                options = [*(["--threads", str(args.threads)] if args.threads else []), *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]
                r = run_predict(checkpoints[key], ct, out, args.device, env, log, precision, options, engine)
                label = next(out.glob("*.nii.gz"), out / "ct.nii.gz")  # named after the case (an nnU-Net channel suffix dropped)
                problem = f"failed (rc {r['rc']}): see {log}" if r["rc"] else check_output(label, shape)
                failed |= bool(problem)
                if problem and r["rc"]:
                    tail = log.read_text().strip().splitlines()[-15:]
                    print("\n".join("    " + line for line in tail), file=sys.stderr)
                peak = r["maxrss_kib"] * 1024 / 2**30
                goal = GOALS.get(key)
                note = problem or (f"goal {goal:.0f} s {'met' if r['wall'] <= goal else 'missed'}" if goal and full else "")
                tag = ("demo" if key == "demo" else f"{key}_{px}") + ("" if (engine, precision) == settings[0] else f"_{name}")
                dice = None
                if not problem and first_label is not None:
                    dice = dice_per_class(label, first_label)
                    note = (note + "; " if note else "") + "Dice vs " + reference + ": " + " ".join(f"{n} {d:.4f}" for n, d in dice.items())
                print(f"{key:<11} {variant:<16} {px:>5} {name:>11} {depth:>6} {r['wall']:>8.1f} {r['wall'] / depth:>8.3f} {r['cpu']:>8.1f} {peak:>9.2f} {load:>5.1f}  {note}")
                print(f"    $ {r['command']}")
                if not problem:
                    results.append(f"{tag}_s={r['wall']:.1f}")
                    results.append(f"{tag}_peak_gib={peak:.2f}")
                    if dice is not None:
                        results.append(f"{tag}_dice_min={min(dice.values()):.4f}")
                    if first_label is None:
                        first_label = label
        print("RESULT " + " ".join(results))
        if failed:
            raise SystemExit(1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
