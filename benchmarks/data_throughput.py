"""Data throughput: prompted samples per second of the NIfTI slice pipeline from the preprocessing
cache vs a naive loader that re-reads the volume for every sample, and of the Cityscapes pipeline.

    .venv/bin/python benchmarks/data_throughput.py [--samples N] [--naive-samples N]

Synthetic data at the generators' default sizes (CT phantom 8 cases of 128×128×32; Cityscapes-style
24 train images of 512×256) is written to a temporary folder. Each pipeline is
``PromptedDataset.__getitem__`` at 256² with box prompts (training mode: the trainer's hot path),
one process, ``torch.set_num_threads(1)`` and ``cv2.setNumThreads(1)`` (per-core figures). Naive
and cached loaders must give the same arrays (asserted on a few samples, evaluation mode). One run.
The last line is ``RESULT nifti_cached_vs_naive=<ratio> nifti_samples_per_s_per_core=<n>
cityscapes_samples_per_s_per_core=<n>``; targets: ratio >= 20, >= 200 samples/s per core.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import torch

from samtune.datasets import sample as S
from samtune.datasets.cityscapes import CityscapesSource
from samtune.datasets.nifti import NiftiSliceSource, read_dataset
from samtune.datasets.synthetic import generate_cityscapes, generate_ct_phantom
from samtune.adapters.preprocess import LongestSideTransform
from samtune.constants import DEFAULT_WINDOW_HU
from samtune.datasets.source import SliceSource
from samtune.finetune.data import make_prompted
from samtune.finetune.recipe import validate_recipe

IMAGE_SIZE = 256
WINDOW = DEFAULT_WINDOW_HU  # ct_abdomen


class NaiveNiftiSource(SliceSource):
    """The same slices as a cached source, but every load re-reads its volume from disk:
    nibabel load + as_closest_canonical + window, written independently of samtune's volume code."""

    def __init__(self, cached: NiftiSliceSource, cases):
        self.cached = cached  # for the slice list and index only (what sampling needs up front)
        self.class_names = cached.class_names
        self.files = {c.name: (c.image, c.label) for c in cases}

    def __len__(self) -> int:
        return len(self.cached)

    def item_id(self, index: int) -> str:
        return self.cached.item_id(index)

    def slice_classes(self, index: int) -> dict[int, int]:
        return self.cached.slice_classes(index)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        case, z = self.item_id(index).split("/z")
        image_path, label_path = self.files[case]
        image = nib.as_closest_canonical(nib.load(image_path)).get_fdata(dtype=np.float32)
        label = np.asarray(nib.as_closest_canonical(nib.load(label_path)).dataobj).astype(np.uint8)
        lo, hi = WINDOW  # the whole volume, as samtune's loader before the cache did
        image = np.round((np.clip(image, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        plane = image[:, :, int(z)].T[::-1]  # canonical x×y -> rows anterior first
        return np.ascontiguousarray(plane), np.ascontiguousarray(label[:, :, int(z)].T[::-1])


def samples_per_second(dataset, n: int, seed: int = 0) -> tuple[float, float, float]:
    """(samples per CPU second, CPU seconds, wall seconds) over ``n`` seeded random indices, after
    one warm-up sample. The rate uses this process's CPU time: with one thread that is the
    per-core throughput, unaffected by other programs sharing the machine's cores."""
    order = np.random.default_rng(seed).integers(0, len(dataset), n)
    dataset[int(order[0])]
    wall, cpu = time.perf_counter(), time.process_time()
    for k in order:
        dataset[int(k)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return n / cpu, cpu, wall


def check_same_output(naive_ds, cached_ds, n: int = 5) -> None:
    for k in np.linspace(0, len(cached_ds) - 1, n).astype(int):
        a, b = naive_ds.source.load(int(cached_ds.pairs[k][0])), cached_ds.source.load(int(cached_ds.pairs[k][0]))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        sa, sb = naive_ds[int(k)], cached_ds[int(k)]
        for key in (S.IMAGE, S.MASKS, S.BOXES):
            assert torch.equal(sa[key], sb[key]), key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600, help="samples timed for the cached and Cityscapes pipelines")
    parser.add_argument("--naive-samples", type=int, default=60, help="samples timed for the naive NIfTI loader")
    parser.add_argument(
        "--ct-shape", type=int, nargs=3, default=[512, 512, 48], metavar=("X", "Y", "Z"),
        help="phantom volume in voxels; 512×512 in-plane is what clinical CT has (the demo uses 128×128×32)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    transform = LongestSideTransform(IMAGE_SIZE)
    recipe = validate_recipe({"data": {"kind": "nifti", "root": "-"}, "prompts": {"positive_points": 0, "box_jitter_px": 5}})

    with tempfile.TemporaryDirectory(prefix="samtune-bench-") as tmp:
        tmp = Path(tmp)
        ct_root = generate_ct_phantom(tmp, shape=tuple(args.ct_shape), spacing_mm=(0.8, 0.8, 5.0))
        cs_root = generate_cityscapes(tmp / "cityscapes")
        cases, classes = read_dataset(ct_root)

        start = time.perf_counter()
        cached_src = NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp / "cache", empty_slice_ratio=0.0)
        build_s = time.perf_counter() - start
        naive_src = NaiveNiftiSource(cached_src, cases)
        check_same_output(
            make_prompted(naive_src, recipe, transform, training=False),
            make_prompted(cached_src, recipe, transform, training=False),
        )
        rows = []
        naive_rate, *naive_s = samples_per_second(make_prompted(naive_src, recipe, transform, training=True), args.naive_samples)
        rows.append(("nifti naive (re-read volume per sample)", args.naive_samples, *naive_s, naive_rate))
        cached_rate, *cached_s = samples_per_second(make_prompted(cached_src, recipe, transform, training=True), args.samples)
        rows.append(("nifti cached (memory-mapped slices)", args.samples, *cached_s, cached_rate))
        cs_rate, *cs_s = samples_per_second(make_prompted(CityscapesSource(cs_root, "train"), recipe, transform, training=True), args.samples)
        rows.append(("cityscapes (512×256 PNG pairs)", args.samples, *cs_s, cs_rate))

    print(f"prompted samples at {IMAGE_SIZE}² with box prompts, 1 thread, 1 process; cache built once in {build_s:.2f} s (8 cases)")
    print(f"{'pipeline':<42} {'samples':>8} {'cpu s':>7} {'wall s':>7} {'samples/s/core':>15}")
    print("-" * 82)
    for name, n, cpu, wall, rate in rows:
        print(f"{name:<42} {n:>8} {cpu:>7.2f} {wall:>7.2f} {rate:>15.1f}")
    print("-" * 82)
    ratio = cached_rate / naive_rate
    print(f"cached / naive: {ratio:.1f}× (target >= 20×); per core: nifti {cached_rate:.0f}/s, cityscapes {cs_rate:.0f}/s (target >= 200/s)")
    print(f"RESULT nifti_cached_vs_naive={ratio:.1f} nifti_samples_per_s_per_core={cached_rate:.0f} cityscapes_samples_per_s_per_core={cs_rate:.0f}")


if __name__ == "__main__":
    main()
