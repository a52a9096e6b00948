"""DICOM in and out at clinical size: a generated 512×512×300 int16 CT series (300 files, as a
PACS export) found and read as a volume (``find_series`` + ``read_series``), a 4-class label of it
written as DICOM-SEG (BINARY and LABELMAP, ``write_seg``) and read back (``read_seg``). Seconds and
peak Python heap (tracemalloc) per step, one run; last line ``RESULT ...``.

    python benchmarks/dicom_io.py [--slices 300] [--size 512] [--keep DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def timed(fn):
    tracemalloc.start()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return value, seconds, peak


def organ_label(shape: tuple[int, int, int]) -> np.ndarray:
    """Four ellipsoids (liver, spleen, kidneys) filling ~10 % of the volume, (i, j, k) layout."""
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    label = np.zeros(shape, np.uint8)
    for value, (ci, cj, ck, ri, rj, rk) in enumerate([(0.35, 0.45, 0.5, 0.2, 0.18, 0.3), (0.7, 0.4, 0.5, 0.1, 0.1, 0.2),
                                                      (0.3, 0.65, 0.45, 0.06, 0.07, 0.15), (0.7, 0.65, 0.45, 0.06, 0.07, 0.15)], 1):  # fmt: skip
        inside = ((i / shape[0] - ci) / ri) ** 2 + ((j / shape[1] - cj) / rj) ** 2 + ((k / shape[2] - ck) / rk) ** 2 <= 1
        label[inside] = value
    return label


def main() -> None:
    import highdicom  # noqa: F401  (imported before the clock starts: its import is not a write's time)

    from samtune.datasets.dicom_seg import read_seg, write_seg
    from samtune.datasets.dicom_series import choose_series, find_series, read_series
    from samtune.datasets.label_codes import LabelClass, resolve_codes
    from samtune.datasets.synthetic_dicom import write_series

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep the files (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="samtune-dicom-bench-"))
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, (args.slices, args.size, args.size), dtype=np.int16)
    _, t_write, _ = timed(lambda: write_series(folder / "CT", stored, spacing_mm=(0.78, 0.78, 1.5)))
    (found, _), t_find, m_find = timed(lambda: find_series(folder / "CT"))
    volume, t_read, m_read = timed(lambda: read_series(choose_series(found)))
    label = organ_label(volume.image.shape)
    names = ["liver", "spleen", "kidney_right", "kidney_left"]
    codes = resolve_codes(names)
    classes = [LabelClass(v, n, codes[n]) for v, n in enumerate(names, 1)]
    rows = [(f"write the CT series (test data, {args.slices} files)", t_write, None), ("find_series", t_find, m_find), ("read_series", t_read, m_read)]
    results = {"read_s": t_read, "read_peak_mb": m_read}
    for kind in ("BINARY", "LABELMAP"):
        seg = folder / f"seg_{kind.lower()}.dcm"
        _, t_seg, m_seg = timed(lambda: write_seg(label, volume.sources, classes, seg, algorithm_version="bench", checkpoint="bench", segmentation_type=kind))  # noqa: B023
        (back, _), t_back, m_back = timed(lambda: read_seg(seg, volume.sources))  # noqa: B023
        assert np.array_equal(back, label), kind
        rows += [(f"write_seg {kind} ({seg.stat().st_size / 2**20:.1f} MiB)", t_seg, m_seg), (f"read_seg {kind}", t_back, m_back)]
        results.update({f"seg_{kind.lower()}_write_s": t_seg, f"seg_{kind.lower()}_write_peak_mb": m_seg})
    print(f"{args.size}×{args.size}×{args.slices} int16 CT; {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'step':<48} {'seconds':>8} {'peak heap MiB':>14}")
    for name, seconds, peak in rows:
        print(f"{name:<48} {seconds:8.2f} {'' if peak is None else f'{peak:14.0f}'}")
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
