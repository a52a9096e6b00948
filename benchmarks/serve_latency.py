"""``samtune serve`` latency through the real HTTP API: the first automatic inference of a whole CT
and the median click, as a viewer sees them.

For each checkpoint a server is started in this process (uvicorn on a free loopback port, token
on, as a hospital deployment), the generated CT is uploaded once as a session (``PUT /session/``,
as the 3D Slicer module does), then timed from the client side, each a complete HTTP round trip
including writing and sending the label file:

- ``first_auto``: ``POST /infer/auto?session_id=...``: read the volume, encode every slice, decode
  every class prompt, fuse, write the label NIfTI, send it;
- ``click``: ``POST /infer/clicks?session_id=...`` with one more click each time (foreground inside
  a class the proposal found, then a background click beside it, cycling over the classes, as a
  user correcting; ``--clicks`` of them), the median. A click costs decoder passes on the clicked
  slice and the slices the correction is carried to, plus writing the answer: the slices'
  embeddings are kept from the automatic inference.

Input: the generated 512×512×300 int16 CT of ``benchmarks/predict_volume.py`` (``--size``,
``--slices``). Checkpoints as there: ``demo`` (``samtune train recipes/demo.yaml``'s, skipped with a
note when missing) and ``mobile_sam`` at ``--image-size`` px (random weights + class prompts).

    .venv/bin/python benchmarks/serve_latency.py --slices 16 --size 128        # quick check
    .venv/bin/python benchmarks/serve_latency.py                                # 512×512×300, both rows

Goals of issue 19 on the 2-core CPU: a click in <= 0.5 s with the demo checkpoint, <= 1 s with
MobileSAM at 512 px. Last line: ``RESULT first_auto_s=.. click_s=.. click_vs_first=..`` for the demo
row (the first row run), then ``<row>_first_auto_s=.. <row>_click_s=..`` for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from predict_volume import cpu_description, make_checkpoint, write_ct  # noqa: E402

ROWS = ("demo", "mobile_sam")
TOKEN = "benchmark-token"


def start_server(checkpoint: Path, studies: Path, device: str):
    import uvicorn

    from samtune.finetune.serve.app import create_app
    from samtune.finetune.serve.server import ServeSettings, build_state

    state = build_state(ServeSettings(checkpoint, studies, token=TOKEN, device=device))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def decode_multipart(response) -> tuple[dict, bytes]:
    """(params, label file bytes) of a multipart /infer answer."""
    from email.parser import BytesParser

    message = BytesParser().parsebytes(b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content)
    params, data = {}, b""
    for part in message.get_payload():
        if part.get_filename():
            data = part.get_payload(decode=True)
        else:
            params = json.loads(part.get_payload(decode=True))
    return params, data


def click_plan(label: np.ndarray, n: int) -> list[tuple[str, list, list]]:
    """``n`` click sets (class, foreground, background), growing as a user's corrections do."""
    plan, fg, bg = [], {}, {}
    classes = [c for c in range(1, int(label.max()) + 1) if (label == c).any()] or [1]
    for step in range(n):
        c = classes[(step // 2) % len(classes)]
        voxels = np.argwhere(label == c) if (label == c).any() else np.argwhere(np.ones_like(label, bool))
        centre = voxels[len(voxels) // 2].tolist()
        if step % 2 == 0:
            fg.setdefault(c, []).append(centre)
        else:
            bg.setdefault(c, []).append([min(centre[0] + 12, label.shape[0] - 1), centre[1], centre[2]])
        plan.append((c, list(fg.get(c, [])), list(bg.get(c, []))))
    return plan


def run_row(name: str, checkpoint: Path, ct: Path, work: Path, clicks: int, device: str) -> dict:
    import nibabel as nib
    import requests

    studies = work / f"studies_{name}"
    server, thread, url = start_server(checkpoint, studies, device)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with open(ct, "rb") as f:
            t = time.perf_counter()
            session = requests.put(f"{url}/session/", files={"files": ("ct.nii.gz", f)}, headers=headers, timeout=600).json()["session_id"]
            upload_s = time.perf_counter() - t
        t = time.perf_counter()
        r = requests.post(f"{url}/infer/auto?image=ct&session_id={session}", data={"params": "{}"}, headers=headers, timeout=3600)
        first = time.perf_counter() - t
        r.raise_for_status()
        params, data = decode_multipart(r)
        label = np.asarray(nib.Nifti1Image.from_bytes(_gunzip(data)).dataobj)
        names = list(params["label_names"])
        times = []
        for c, fg, bg in click_plan(label, clicks):
            body = {"label": names[c - 1], "foreground": fg, "background": bg}
            t = time.perf_counter()
            r = requests.post(f"{url}/infer/clicks?image=ct&session_id={session}", data={"params": json.dumps(body)}, headers=headers, timeout=600)
            times.append(time.perf_counter() - t)
            r.raise_for_status()
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return {"upload_s": upload_s, "first_auto_s": first, "click_s": statistics.median(times), "clicks": times}


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, help="mobile_sam's input size (default: --size)")
    parser.add_argument("--clicks", type=int, default=8, help="click requests per row (default 8; the median is reported)")
    parser.add_argument("--demo-checkpoint", default="runs/demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", help="folder for the CT, checkpoints and studies (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    cpu, flags = cpu_description()
    print(f"CPU: {cpu}; flags: {', '.join(k for k, v in flags.items() if v) or 'none of avx512/amx'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; device {args.device}")  # fmt: skip
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    ct_folder = work / "ct"
    ct_folder.mkdir(exist_ok=True)
    ct = ct_folder / f"ct_{args.size}x{args.size}x{args.slices}.nii.gz"
    if not ct.is_file():
        write_ct(ct, args.size, args.slices)
    results = {}
    for row in args.rows:
        if row == "demo":
            checkpoint = Path(args.demo_checkpoint)
            if not checkpoint.exists():
                print(f"demo: skipped, no {checkpoint} (run `samtune train recipes/demo.yaml` first)")
                continue
        else:
            checkpoint = make_checkpoint(row, args.image_size or args.size, work, ct_folder)
        results[row] = run_row(row, checkpoint, ct, work, args.clicks, args.device)
        r = results[row]
        print(f"{row:11s} upload {r['upload_s']:6.2f} s   first auto {r['first_auto_s']:7.2f} s   median click {r['click_s']:6.3f} s   "
              f"clicks: {' '.join(f'{t:.3f}' for t in r['clicks'])}")  # fmt: skip
    parts = []
    if results:
        first_row = next(iter(results.values()))
        parts += [f"first_auto_s={first_row['first_auto_s']:.2f}", f"click_s={first_row['click_s']:.3f}",
                  f"click_vs_first={first_row['click_s'] / first_row['first_auto_s']:.4f}"]  # fmt: skip
    for row, r in results.items():
        parts += [f"{row}_first_auto_s={r['first_auto_s']:.2f}", f"{row}_click_s={r['click_s']:.3f}"]
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
