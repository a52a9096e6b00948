"""Sessions: random ids checked on every use, expiry, nothing of the server's paths in answers."""

from __future__ import annotations

import json
import time

import pytest

from samtune.finetune.serve.errors import NotFound
from samtune.finetune.serve.sessions import Sessions


def _upload(tmp_path):
    path = tmp_path / "upload.nii.gz"
    path.write_bytes(b"volume")
    return path


def test_create_get_remove(tmp_path):
    sessions = Sessions(tmp_path / "s")
    session_id, info = sessions.create(_upload(tmp_path), "ct.nii.gz")
    assert len(session_id) == 32 and sessions.image(session_id).read_bytes() == b"volume"
    assert sessions.get(session_id)["name"] == "ct.nii.gz"
    sessions.remove(session_id)
    with pytest.raises(NotFound):
        sessions.get(session_id)


@pytest.mark.parametrize("bad", ["../../etc", "..", "/etc/passwd", "0" * 31, "g" * 32])
def test_ids_that_are_not_session_ids_are_not_found(tmp_path, bad):
    with pytest.raises(NotFound) as info:
        Sessions(tmp_path / "s").get(bad)
    assert info.value.field == "session_id"


def test_idle_sessions_expire(tmp_path):
    sessions = Sessions(tmp_path / "s", expiry_s=60)
    old, _ = sessions.create(_upload(tmp_path), "a")
    info_file = sessions.folder / old / "info.json"
    info = json.loads(info_file.read_text())
    info["last_access_ts"] = int(time.time()) - 61
    info_file.write_text(json.dumps(info))
    fresh, _ = sessions.create(_upload(tmp_path), "b")  # creating prunes
    assert not (sessions.folder / old).exists() and (sessions.folder / fresh).exists()
