"""``/train/``: retrain on the studies folder's labelled images in a subprocess, so a corrected
label becomes training data without leaving the viewer.

The run is ``samtune train`` with the served checkpoint's own recipe (``CHECKPOINT/recipe.yaml``),
``data.root`` set to the studies folder (an nnU-Net v2 layout that ``data.kind: nifti`` reads;
images still without a label are left out) and ``output.dir`` set to
``STUDIES/.samtune/runs/{YYYYmmdd-HHMMSS}/``. A client may set ``steps`` (``train.steps``); no other
recipe key crosses the wire (a key such as ``output.dir`` would let a client write anywhere). The
server keeps serving its checkpoint; start it again with ``--checkpoint`` on the new run to use the
retrained model.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from samtune.finetune.serve.errors import BadRequest, RequestError

LOG_LINES = 20


class Conflict(RequestError):
    status = 409


class TrainJob:
    """At most one training subprocess at a time."""

    def __init__(self, checkpoint: Path, studies, min_labelled: int = 2):
        self.checkpoint = Path(checkpoint)
        self.studies = studies
        self.min_labelled = min_labelled
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._record: dict | None = None
        self._log: Path | None = None

    def config(self) -> dict:
        """What ``/info/`` lists under ``trainers``: the one key a client may set."""
        return {"samtune": {"description": "samtune train with the served checkpoint's recipe on the labelled studies",
                            "config": {"steps": self._recipe().train.steps}}}  # fmt: skip

    def _recipe(self):
        from samtune.finetune.recipe import load_recipe

        return load_recipe(self.checkpoint / "recipe.yaml")

    def start(self, params: dict) -> dict:
        with self._lock:
            if self.running():
                raise Conflict("train", "a training run is already going; DELETE /train/ stops it")
            steps = params.get("steps")
            if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1_000_000):
                raise BadRequest("steps", f"{steps!r}: a whole number of training steps, 1..1000000")
            recipe = self._recipe()
            if recipe.data.kind != "nifti":
                raise BadRequest("train", f"the checkpoint was trained on data.kind: {recipe.data.kind}; retraining from the server reads the studies folder as nifti")
            labelled = self.studies.labelled()
            if len(labelled) < self.min_labelled:
                raise BadRequest("train", f"{len(labelled)} labelled image(s) in the studies folder; save final labels of at least {self.min_labelled} (one is kept for validation)")
            run = self.studies.meta_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
            run.mkdir(parents=True, exist_ok=True)
            overrides = [f"data.root={self.studies.root.resolve()}", f"output.dir={run.resolve()}"]
            overrides += [f"train.steps={steps}"] if steps is not None else []
            command = [sys.executable, "-m", "samtune", "train", str(self.checkpoint / "recipe.yaml"), *overrides]
            self._log = run / "train.log"
            with open(self._log, "wb") as log:
                self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            ignored = sorted(set(params) - {"steps", "client_id"})
            self._record = {"id": run.name, "name": "samtune", "status": "RUNNING", "start_ts": int(time.time()),
                            "labelled_images": len(labelled), "output": str(run.relative_to(self.studies.root)),
                            "ignored_params": ignored}  # fmt: skip
            return dict(self._record)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def status(self) -> dict | None:
        """The last run (None before any): status RUNNING, SUCCESS, FAILED or STOPPED, the log's last lines."""
        with self._lock:
            if self._record is None:
                return None
            code = self._process.poll()
            if code is not None and self._record["status"] == "RUNNING":
                self._record["status"] = "SUCCESS" if code == 0 else "FAILED"
                self._record["end_ts"] = int(time.time())
            lines = self._log.read_text(errors="replace").splitlines()[-LOG_LINES:] if self._log and self._log.is_file() else []
            return {**self._record, "details": lines}

    def stop(self) -> dict:
        with self._lock:
            if not self.running():
                return {}
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._record.update(status="STOPPED", end_ts=int(time.time()))
            return dict(self._record)
