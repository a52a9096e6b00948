"""`samtune predict`'s automatic path vs a naive promptable-only loop: seconds per slice/image.

samtune (``Predictor.automatic_maps``): every slice goes through the image encoder once and the
mask decoder answers all K learnt class prompts in one call (``decode_classes``), slices in
batches of ``eval.batch_size``; the B×K logits are upscaled, mapped to the original grid and fused
into one label map (finetune/automatic.py). Naive: what a promptable-only SAM needs, for each
class, for each slice, encoder + decoder with one box prompt (``Predictor.prompted_mask``, the
prompted path of ``samtune predict``), each mask painted into the label map. Both include loading
and preprocessing the slice and run the same model: random weights (timing depends on shapes, not
values) with class prompts, wrapped in unmerged LoRA (encoder qkv, rank 4) as a checkpoint loads.

Inputs (synthetic, in memory): a CT phantom-like 512×512×Z volume with K=4 classes (``--slices``
of it are timed) and Cityscapes-size 2048×1024 RGB images with K=19 classes (``--images``). Models:
``tiny`` (4-block random-init SAM of the registry) and ViT-B (``sam-vit-base`` shapes, random init:
``encoder_speed.sam_config``, no download). Per model: one warm-up of each path, then both paths
side by side per input; best of ``--repeats``. ViT-B is slow on CPU (about 7 s per 512² and 70 s
per 1024² encoder pass on one contended core), so by default it times few slices and extrapolates
the naive loop from ``--naive-calls`` prompted calls (each costs the same: one encoder + one decoder
pass); rows where that happened say so. Per-volume times for a ``--volume-slices`` CT are
extrapolated from the per-slice times.

``--profile``: where the automatic path spends its time (tiny, 128 px, the demo's 128×128×32
volume, K=4): per stage (data + preprocess, encoder, decoder, upscale, logits_to_original, fuse,
store) with page faults, torch.profiler's top operators, what-ifs (threads, merged LoRA, batch
size), the imports `samtune predict` pays before its first slice, and the stages again on two
2048×1024 images (K=19), where the full-resolution steps weigh more.

On a shared CPU pass ``--threads 1``: with other jobs running, torch's default of one thread per
core was 4× slower here (threads wait for each other), and CPU time then differs from wall time.
Last line: ``RESULT <model>_<size>_<input>_speedup=<naive/samtune> ... <model>_<size>_<input>_samtune_s=<s per image>``
(``--profile``: ``RESULT profile_ms_per_slice=... <stage>_pct=... <what-if>_s=...``).

    .venv/bin/python benchmarks/predict_speed.py --threads 1                    # CPU: tiny 128/256, ViT-B 512
    .venv/bin/python benchmarks/predict_speed.py --threads 1 --models vit_b --sizes 1024 --slices 1 --images 1 --naive-calls 1
    .venv/bin/python benchmarks/predict_speed.py --profile --threads 1
    .venv/bin/python benchmarks/predict_speed.py --device cuda --models tiny vit_b --sizes 512 1024 --slices 32 --naive-calls 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the predictor's progress bars, before tqdm is imported
warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks transformers a deprecated question

import numpy as np
import torch
from transformers import SamModel

sys.path.insert(0, str(Path(__file__).parent))
from encoder_speed import sam_config
from samtune.adapters.family import CLASS_PROMPTS, get_family
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import build_model
from samtune.datasets.semantic import SemanticDataset, collate_semantic
from samtune.datasets.source import LabelSpace, SliceSource
from samtune.finetune.automatic import fuse
from samtune.finetune.predict.prediction import Predictor
from samtune.finetune.recipe import LoraSection

MODELS = ("tiny", "vit_b")
DEFAULT_SIZES = {"tiny": [128, 256], "vit_b": [512]}
DEFAULT_SLICES = {"tiny": 16, "vit_b": 2}
DEFAULT_IMAGES = {"tiny": 2, "vit_b": 1}
DEFAULT_NAIVE_CALLS = {"tiny": 0, "vit_b": 4}  # 0: every class of every slice
CT_CLASSES = ["liver", "spleen", "kidney_right", "kidney_left"]
CITY_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
                "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]  # fmt: skip
THRESHOLD = 0.5  # automatic.threshold default
STAGES = {"data + preprocess": "data", "encoder": "encoder", "decoder (K prompts)": "decoder", "upscale B×K to S×S": "upscale",
          "logits_to_original": "to_original", "fuse + to numpy": "fuse", "store (to_source_ids)": "store"}  # fmt: skip
TOKENS = 2  # automatic.tokens default


# ------------------------------------------------------------------ inputs
class ArraySource(SliceSource):
    """Images held in memory (H×W uint8 grey or H×W×3 RGB) with their label maps; ``load`` copies
    a slice out as the NIfTI source does from its cache."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: dict[int, str], name: str):
        self.images, self.labels, self.class_names, self.name = images, labels, class_names, name
        self.skipped, self.has_labels = [], False

    def __len__(self) -> int:
        return len(self.images)

    def item_id(self, index: int) -> str:
        return f"{self.name}/z{index:03d}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.images[index]), np.zeros(self.images.shape[1:3], np.uint8)

    def subset(self, n: int) -> ArraySource:
        return ArraySource(self.images[:n], self.labels[:n], self.class_names, self.name)


def ct_volume(depth: int, size: int = 512, seed: int = 0) -> ArraySource:
    """A windowed (uint8) abdomen-like phantom: body ellipse, spine, four organ ellipsoids, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size * 2 - 1  # [-1, 1)
    body = (x / 0.86) ** 2 + (y / 0.62) ** 2 < 1
    base = np.where(body, 110.0, 0.0) + np.where(np.hypot(x, y - 0.4) < 0.09, 140.0, 0.0)
    organs = [(1, -0.35, -0.05, 0.36, 0.45, 150.0), (2, 0.5, -0.15, 0.17, 0.28, 170.0),  # liver, spleen (image left = patient right)
              (3, -0.28, 0.3, 0.12, 0.18, 200.0), (4, 0.28, 0.3, 0.12, 0.18, 200.0)]  # kidneys  # fmt: skip
    images = np.empty((depth, size, size), np.uint8)
    labels = np.zeros((depth, size, size), np.uint8)
    for z in range(depth):
        t = z / max(depth - 1, 1)
        image = base.copy()
        for value, cx, cy, rx, ry, grey in organs:
            scale = 0.6 + 0.4 * np.sin(np.pi * (0.2 + 0.6 * t + 0.1 * value))
            mask = ((x - cx) / (rx * scale)) ** 2 + ((y - cy) / (ry * scale)) ** 2 < 1
            image[mask], labels[z][mask] = grey, value
        images[z] = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return ArraySource(images, labels, dict(zip(range(1, 5), CT_CLASSES)), "ct")


def city_images(n: int, width: int = 2048, height: int = 1024, seed: int = 0) -> ArraySource:
    """Street-scene-like RGB images: 19 classes as horizontal bands and blocks, plus noise."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, height, width, 3), np.uint8)
    labels = np.empty((n, height, width), np.uint8)
    colours = rng.integers(0, 256, (19, 3))
    for i in range(n):
        label = np.full((height, width), 10, np.uint8)  # sky
        label[height // 3 : height // 2] = 2  # buildings
        label[height // 2 :] = 0  # road
        label[height // 2 : 2 * height // 3, : width // 8] = 1  # sidewalk
        for k in range(19):
            if k in (0, 2, 10):
                continue
            x0, y0 = int(rng.integers(0, width - width // 8)), int(rng.integers(height // 4, height - height // 6))
            label[y0 : y0 + height // 8, x0 : x0 + width // 12] = k
        images[i] = np.clip(colours[label] + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
        labels[i] = label
    return ArraySource(images, labels, dict(enumerate(CITY_CLASSES)), "city")


def class_boxes(source: ArraySource, space: LabelSpace) -> list[list[np.ndarray]]:
    """Per image, per class: the class's bounding box (x0, y0, x1, y1), or the whole image when absent."""
    out = []
    for label in source.labels:
        h, w = label.shape
        row = []
        for class_id in space.ids:
            ys, xs = np.nonzero(label == class_id)
            row.append(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float) if len(xs) else np.array([0, 0, w, h], float))
        out.append(row)
    return out


def label_space(source: ArraySource, background: int) -> LabelSpace:
    ids = sorted(source.class_names)
    return LabelSpace(ids, [source.class_names[i] for i in ids], background)


# ------------------------------------------------------------------ model and predictor
def build(model_name: str, size: int, n_classes: int, device: str, lora: bool = True):
    family = get_family("sam")
    if model_name == "tiny":
        base = build_model("tiny", image_size=size)
    else:  # sam-vit-base shapes (SamConfig defaults), random init: no download
        config = sam_config("vit_b", size)
        config.vision_config.initializer_range = 0.02  # transformers' 1e-10 default is for loaded weights
        torch.manual_seed(0)
        base = SamModel(config)
    family.add_class_prompts(base, n_classes, TOKENS)
    model = prepare_trainable(base, family, "lora", LoraSection()) if lora else base
    return model.to(device).eval(), family


@dataclass
class Loaded:
    """What ``Predictor`` reads of ``api.LoadedModel`` (a checkpoint folder holding classes.json)."""

    model: torch.nn.Module
    family: object
    device: torch.device
    checkpoint: Path
    image_size: int

    def transform(self):
        return self.family.make_transform(self.image_size)


def make_predictor(model, family, device: str, size: int, space: LabelSpace, batch: int, folder: Path) -> Predictor:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(json.dumps({"tokens": TOKENS, "label_space": space.to_dict()}))
    return Predictor(Loaded(model, family, torch.device(device), folder, size), batch, THRESHOLD)


# ------------------------------------------------------------------ the two paths
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_samtune(predictor: Predictor, source: ArraySource) -> np.ndarray:
    """``samtune predict``'s automatic loop over a source (as ``_predict_volume`` stores it)."""
    out = np.zeros(source.labels.shape, np.uint8)
    for index, index_map in predictor.automatic_maps(source, source.name):
        out[index] = predictor.space.to_source_ids(index_map)
    return out


def run_naive(predictor: Predictor, source: ArraySource, boxes, max_calls: int) -> int:
    """Every class of every slice from its own box prompt (one encoder + decoder pass each);
    stops after ``max_calls`` prompted calls (0: all). Returns the calls made."""
    out = np.zeros(source.labels.shape, np.uint8)
    calls = 0
    for k, class_id in enumerate(predictor.space.ids):
        for z in range(len(source)):
            if max_calls and calls >= max_calls:
                return calls
            image, _ = source.load(z)
            mask = predictor.prompted_mask(image, boxes[z][k], None, None)
            out[z][mask] = class_id
            calls += 1
    return calls


def timed(fn, device: str, repeats: int):
    """(best wall s, CPU s of that run, result) over ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[0]:
            best = (wall, cpu, result)
    return best


def compare(args, model_name: str, size: int, inputs: dict, folder: Path) -> list[dict]:
    rows = []
    n_slices = args.slices if args.slices is not None else DEFAULT_SLICES[model_name]
    n_images = args.images if args.images is not None else DEFAULT_IMAGES[model_name]
    max_calls = args.naive_calls if args.naive_calls is not None else DEFAULT_NAIVE_CALLS[model_name]
    warmed = False
    for kind, (source, background) in inputs.items():
        space = label_space(source, background)
        model, family = build(model_name, size, len(space.ids), args.device)  # K class prompts for this input
        n = n_slices if kind == "ct" else n_images
        source = source.subset(n)
        predictor = make_predictor(model, family, args.device, size, space, args.batch, folder / f"{model_name}_{size}_{kind}")
        boxes = class_boxes(source, space)
        if args.warmup and not warmed:  # once per model and size (same encoder shapes): allocations, kernel selection
            run_samtune(predictor, source.subset(min(args.batch, n)))
            run_naive(predictor, source, boxes, 1)
            warmed = True
        ours, ours_cpu, _ = timed(partial(run_samtune, predictor, source), args.device, args.repeats)
        naive, naive_cpu, calls = timed(partial(run_naive, predictor, source, boxes, max_calls), args.device, args.repeats)
        k = len(space.ids)
        row = {
            "model": model_name, "size": size, "input": kind, "k": k, "n": n, "calls": calls, "all_calls": k * n,
            "ours": ours / n, "naive": naive / calls * k, "ours_cpu": ours_cpu / n, "naive_cpu": naive_cpu / calls * k,
        }  # fmt: skip
        rows.append(row)
        print_row(row, args.volume_slices)
        del model, predictor
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def print_header() -> None:
    print(f"\n{'model':<6} {'size':>5} {'input':<14} {'K':>3} {'timed':>5} {'naive calls':>12} "
          f"{'samtune s/img':>13} {'naive s/img':>12} {'speed-up':>9} {'(CPU t)':>8} "
          f"{'samtune s/vol*':>14} {'naive s/vol*':>13}")  # fmt: skip


def print_row(row: dict, volume_slices: int) -> None:
    what = "CT 512²×Z" if row["input"] == "ct" else "2048×1024"
    calls = f"{row['calls']}/{row['all_calls']}" + ("" if row["calls"] == row["all_calls"] else " ext")
    ratio, cpu_ratio = row["naive"] / row["ours"], row["naive_cpu"] / row["ours_cpu"]
    vol = (f"{row['ours'] * volume_slices:>14.1f} {row['naive'] * volume_slices:>13.1f}" if row["input"] == "ct" else f"{'':>14} {'':>13}")
    print(f"{row['model']:<6} {row['size']:>5} {what:<14} {row['k']:>3} {row['n']:>5} {calls:>12} "
          f"{row['ours']:>13.4f} {row['naive']:>12.4f} {ratio:>8.1f}× {cpu_ratio:>7.1f}× {vol}", flush=True)  # fmt: skip


# ------------------------------------------------------------------ profile
def faults() -> int:
    """Minor page faults of this process so far (fresh memory: costly on some VMs)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def stage_times(predictor: Predictor, source: ArraySource, batch_size: int, device: str) -> dict[str, list[float]]:
    """Seconds and page faults per stage: the calls of ``Predictor.automatic_maps`` ->
    ``predict_index_maps`` -> ``class_logits``, in their order, with a timer between them."""
    model, family, space = predictor.model, predictor.family, predictor.space
    acc = {s: [0.0, 0] for s in STAGES}
    out = np.zeros(source.labels.shape, np.uint8)
    dataset = SemanticDataset(source, predictor.transform, space, training=False)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_semantic))

    def tick(name, start, f0):
        sync(device)
        acc[name][0] += time.perf_counter() - start
        acc[name][1] += faults() - f0
        return time.perf_counter(), faults()

    with torch.no_grad():
        while True:
            t, f = time.perf_counter(), faults()
            batch = next(loader, None)
            if batch is None:
                break
            images = batch["image"].to(device)
            t, f = tick("data + preprocess", t, f)
            embeddings = family.encode_images(model, images)
            t, f = tick("encoder", t, f)
            low_res = family.decode_classes(model, embeddings, getattr(model, CLASS_PROMPTS)())
            t, f = tick("decoder (K prompts)", t, f)
            logits = family.upscale_logits(low_res.float(), images.shape[-1])
            t, f = tick("upscale B×K to S×S", t, f)
            for i, meta in enumerate(batch["meta"]):
                original = family.logits_to_original(logits[i], meta["resized_size"], meta["original_size"])
                t, f = tick("logits_to_original", t, f)
                index_map = fuse(original, THRESHOLD).to(torch.uint8).cpu().numpy()
                t, f = tick("fuse + to numpy", t, f)
                out[meta["index"]] = space.to_source_ids(index_map)
                t, f = tick("store (to_source_ids)", t, f)
    return acc


def stage_table(title: str, predictor: Predictor, source: ArraySource, args) -> tuple[float, dict, float]:
    """Print the stages of the automatic path on ``source``; returns (automatic_maps s, stages, sum)."""
    run_samtune(predictor, source)  # warm-up
    best = min((stage_times(predictor, source, args.batch, args.device) for _ in range(args.repeats)), key=lambda a: sum(v[0] for v in a.values()))
    total, total_cpu, _ = timed(lambda: run_samtune(predictor, source), args.device, args.repeats)
    staged, n = sum(v[0] for v in best.values()), len(source)
    print(f"\n{title}: automatic_maps {total:.3f} s ({total / n * 1e3:.1f} ms/image, CPU {total_cpu:.3f} s); sum of stages {staged:.3f} s")
    print(f"{'stage':<24} {'s':>8} {'%':>6} {'ms/image':>9} {'page faults':>12}")
    for name, (seconds, n_faults) in best.items():
        print(f"{name:<24} {seconds:>8.4f} {100 * seconds / staged:>5.1f}% {seconds / n * 1e3:>9.2f} {n_faults:>12,}")
    return total, best, staged


def profile(args) -> None:
    """Where the automatic path spends its time: stage table, torch.profiler's top operators and
    what-ifs on the demo's volume (tiny @ 128 px, 128×128×32, K=4); the stage table again on
    2048×1024 images (K=19), where the full-resolution steps weigh more."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    size, depth, device = 128, 32, args.device
    source = ct_volume(depth, size=128)
    space = label_space(source, 0)
    model, family = build("tiny", size, len(space.ids), device)
    folder = Path(tempfile.mkdtemp(prefix="predict_speed_"))
    predictor = make_predictor(model, family, device, size, space, args.batch, folder / "profile")
    total, best, staged = stage_table(f"tiny @ {size} px, {size}×{size}×{depth} volume (the demo's), K={len(space.ids)}, batch {args.batch}", predictor, source, args)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        run_samtune(predictor, source)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"\ntorch.profiler, one automatic_maps call, top operators by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=48))

    print("what-ifs (automatic_maps on the same volume, best of repeats):")
    results, keys = {"as run": total}, []
    threads = torch.get_num_threads()
    for n in sorted({1, os.cpu_count() or 1} - {threads}):
        torch.set_num_threads(n)
        run_samtune(predictor, source)
        results[f"torch threads {n} (vs {threads})"] = timed(lambda: run_samtune(predictor, source), device, args.repeats)[0]
        keys.append(f"threads{n}")
    torch.set_num_threads(threads)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    merged_predictor = make_predictor(merged, family, device, size, space, args.batch, folder / "merged")
    run_samtune(merged_predictor, source)
    results["LoRA merged (merge_and_unload)"] = timed(lambda: run_samtune(merged_predictor, source), device, args.repeats)[0]
    keys.append("lora_merged")
    for batch in (4, 32):
        other = make_predictor(model, family, device, size, space, batch, folder / f"batch{batch}")
        run_samtune(other, source)
        results[f"batch {batch} (vs {args.batch})"] = timed(partial(run_samtune, other, source), device, args.repeats)[0]
        keys.append(f"batch{batch}")
    for name, seconds in results.items():
        print(f"  {name:<34} {seconds:>7.3f} s  {seconds / depth * 1e3:>6.1f} ms/slice  {total / seconds:>5.2f}× vs as run")
    imports = import_seconds("samtune.finetune.api", ("torch", "monai", "peft", "albumentations"))
    print("imports before `samtune predict` reads a scan (samtune.finetune.api, fresh interpreter, -X importtime, best of 2; "
          "cumulative s, the first importer of a shared dependency is charged for it): "
          + ", ".join(f"{name} {seconds:.2f}" for name, seconds in imports.items()))
    results["imports"] = imports["samtune.finetune.api"]
    keys.append("imports")
    city = city_images(2)
    city_space = label_space(city, 255)
    city_model, _ = build("tiny", size, len(city_space.ids), device)
    city_predictor = make_predictor(city_model, family, device, size, city_space, args.batch, folder / "city")
    city_total, city_best, city_staged = stage_table(f"tiny @ {size} px, 2 images of 2048×1024, K={len(city_space.ids)}", city_predictor, city, args)
    results["city_ms_per_image"] = city_total / len(city) * 1e3
    keys.append("city_ms_per_image")
    shares = " ".join(f"{STAGES[name]}_pct={100 * s / staged:.0f}" for name, (s, _) in best.items())
    shares += " " + " ".join(f"city_{STAGES[name]}_pct={100 * s / city_staged:.0f}" for name, (s, _) in city_best.items())
    what_ifs = " ".join(f"{key}{'' if key.endswith('image') else '_s'}={seconds:.3f}" for key, seconds in zip(("as_run", *keys), results.values()))
    print(f"RESULT profile_ms_per_slice={total / depth * 1e3:.1f} {shares} {what_ifs}")


def import_seconds(module: str, parts: tuple[str, ...]) -> dict[str, float]:
    """Cumulative import seconds of ``module`` and of the first import of each of ``parts``."""
    import subprocess

    best: dict[str, float] = {}
    for _ in range(2):  # the first may read files from disk
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True).stderr
        found = {}
        for line in err.splitlines():
            fields = line.split("|")
            if len(fields) == 3 and fields[2].strip() in (module, *parts) and fields[2].strip() not in found:
                found[fields[2].strip()] = int(fields[1]) / 1e6
        best = {k: min(v, best.get(k, v)) for k, v in found.items()}
    return {k: best[k] for k in (module, *parts) if k in best}


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, help="model input sizes for every model (default: tiny 128 256, vit_b 512)")
    parser.add_argument("--slices", type=int, help="CT slices timed (default: tiny 16, vit_b 2)")
    parser.add_argument("--images", type=int, help="2048×1024 images timed (default: tiny 2, vit_b 1)")
    parser.add_argument("--naive-calls", type=int, help="most prompted calls of the naive loop per input, the rest extrapolated; 0 = all (default: tiny all, vit_b 4)")
    parser.add_argument("--inputs", nargs="+", default=["ct", "city"], choices=["ct", "city"])
    parser.add_argument("--batch", type=int, default=16, help="slices per automatic batch (eval.batch_size default 16)")
    parser.add_argument("--volume-slices", type=int, default=300, help="slices of the CT the per-volume times are extrapolated to")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, the machine's cores)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, choices=[0, 1])
    parser.add_argument("--profile", action="store_true", help="profile the automatic path (tiny, 128 px, 128×128×32) instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, {where}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.profile:
        profile(args)
        return

    total_slices = max((args.slices or 0), *(DEFAULT_SLICES[m] for m in args.models))
    total_images = max((args.images or 0), *(DEFAULT_IMAGES[m] for m in args.models))
    inputs = {}
    if "ct" in args.inputs:
        inputs["ct"] = (ct_volume(total_slices), 0)  # background 0
    if "city" in args.inputs:
        inputs["city"] = (city_images(total_images), 255)  # Cityscapes: no background class
    print(f"samtune = Predictor.automatic_maps (batch {args.batch}); naive = Predictor.prompted_mask per class per slice; "
          f"s/img = seconds per slice or image (wall, best of {args.repeats}); 'ext': naive extrapolated from that many calls; "
          f"(CPU t): speed-up in process CPU time; "
          f"* extrapolated to a {args.volume_slices}-slice CT")  # fmt: skip
    print_header()
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict_speed_") as folder:
        for model_name in args.models:
            for size in args.sizes or DEFAULT_SIZES[model_name]:
                rows += compare(args, model_name, size, inputs, Path(folder))
    results = [f"{r['model']}_{r['size']}_{r['input']}_speedup={r['naive'] / r['ours']:.1f}" for r in rows]
    results += [f"{r['model']}_{r['size']}_{r['input']}_samtune_s={r['ours']:.4f}" for r in rows]
    print("RESULT " + " ".join(results))


if __name__ == "__main__":
    main()
