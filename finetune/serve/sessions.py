"""Sessions: a volume the viewer holds locally, uploaded once (``PUT /session/``) and then named
by its ``session_id`` in every ``/infer`` call, so a click sends a few numbers, not the volume
(nnInteractive's Slicer users found moving whole volumes dominated interactive latency).

Each session is a folder ``SESSIONS/{session_id}/`` with ``image.nii.gz`` and ``info.json``; ids
are random hex (``secrets.token_hex``), checked on every use, so a request never names a path. A
session not used for ``expiry`` seconds is removed (MONAI Label's default is one hour).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

from samtune.files import write_json_atomic
from samtune.finetune.serve.errors import NotFound
from samtune.finetune.serve.paths import inside, write_atomic

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_EXPIRY_S = 3600


class Sessions:
    def __init__(self, folder: Path, expiry_s: int = DEFAULT_EXPIRY_S):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.expiry_s = expiry_s
        self._lock = threading.Lock()

    def _dir(self, session_id: str) -> Path:
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise NotFound("session_id", f"{session_id!r} is not a session of this server (PUT /session/ creates one)")
        return inside(self.folder, self.folder / session_id, "session_id")

    def create(self, image: Path, name: str, expiry_s: int | None = None) -> tuple[str, dict]:
        """Move a checked upload into a new session; returns (session_id, info)."""
        self.prune()
        session_id = secrets.token_hex(16)
        folder = self.folder / session_id
        folder.mkdir()
        write_atomic(image, folder / "image.nii.gz")
        now = int(time.time())
        info = {"name": name, "path": str(folder), "image": "image.nii.gz", "create_ts": now, "last_access_ts": now,
                "expiry": int(expiry_s or self.expiry_s)}  # fmt: skip
        write_json_atomic(folder / "info.json", info)
        return session_id, info

    def get(self, session_id: str, touch: bool = True) -> dict:
        folder = self._dir(session_id)
        try:
            info = json.loads((folder / "info.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            raise NotFound("session_id", f"session {session_id} not found (expired or removed); create a new one") from None
        if touch:
            info["last_access_ts"] = int(time.time())
            write_json_atomic(folder / "info.json", info)
        return info

    def image(self, session_id: str) -> Path:
        self.get(session_id)
        return self._dir(session_id) / "image.nii.gz"

    def remove(self, session_id: str) -> dict:
        info = self.get(session_id, touch=False)
        shutil.rmtree(self._dir(session_id), ignore_errors=True)
        return info

    def prune(self) -> list[str]:
        """Remove sessions idle for longer than their expiry; returns their ids."""
        gone = []
        with self._lock:
            now = time.time()
            for folder in self.folder.iterdir():
                if not SESSION_ID.match(folder.name):
                    continue
                try:
                    info = json.loads((folder / "info.json").read_text())
                    idle = now - info["last_access_ts"] > info["expiry"]
                except (FileNotFoundError, json.JSONDecodeError, KeyError):
                    idle = now - folder.stat().st_mtime > self.expiry_s  # a half-made session
                if idle:
                    shutil.rmtree(folder, ignore_errors=True)
                    gone.append(folder.name)
        return gone
