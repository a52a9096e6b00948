"""Starting a server: the checkpoint loaded once, the studies and sessions folders opened, auth
set, then uvicorn (the ASGI server MONAI Label itself runs on) on loopback unless told otherwise."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from samtune import SamtuneError

log = logging.getLogger(__name__)
DEFAULT_MAX_UPLOAD_MB = 2048  # a 512×512×1000 int16 CT is 500 MB uncompressed


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: Path
    studies: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    device: str = "auto"
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    sessions: Path | None = None  # default: STUDIES/.samtune/sessions
    session_expiry_s: int = 3600


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_state(settings: ServeSettings):
    """Everything a server holds, built once (the model is loaded here, before the port opens)."""
    from samtune import __version__
    from samtune.finetune.checkpoints import checkpoint_folder, load_model
    from samtune.finetune.serve.app import ServeState
    from samtune.finetune.serve.auth import Auth
    from samtune.finetune.serve.engine import ServeModel
    from samtune.finetune.serve.sessions import Sessions
    from samtune.finetune.serve.studies import Studies
    from samtune.finetune.serve.training import TrainJob

    if settings.max_upload_mb < 1:
        raise SamtuneError(f"--max-upload-mb {settings.max_upload_mb}: at least 1")
    folder = checkpoint_folder(Path(settings.checkpoint))
    loaded = load_model(folder, device=settings.device)
    engine = ServeModel(loaded)
    studies = Studies(Path(settings.studies), dict(zip(engine.predictor.space.file_values(), engine.names)))
    studies.seg_classes, studies.checkpoint = engine.predictor.classes, str(folder)  # DICOM series: labels saved as DICOM-SEG
    sessions = Sessions(settings.sessions or studies.meta_dir / "sessions", settings.session_expiry_s)
    return ServeState(engine, studies, sessions, Auth(settings.token), TrainJob(folder, studies), settings.max_upload_mb * 2**20, __version__)


def run_server(settings: ServeSettings) -> None:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: FastAPI's form parser)
        import uvicorn
    except ImportError as exc:
        raise SamtuneError(f"samtune serve needs the serve extra ({exc.name} is missing): pip install 'samtune[serve]'") from None

    from samtune.finetune.serve.app import create_app
    from samtune.finetune.serve.auth import TOKEN_ENV

    token = settings.token or os.environ.get(TOKEN_ENV) or None
    settings = ServeSettings(**{**settings.__dict__, "token": token})
    if not is_loopback(settings.host) and token is None:
        log.warning("samtune serve listens on %s with no token: anyone who reaches this port can read the studies and "
                    "run the model. Set --token (or %s) or listen on 127.0.0.1.", settings.host, TOKEN_ENV)  # fmt: skip
    state = build_state(settings)
    classes = ", ".join(state.engine.names)
    log.info("serving %s (%s) on http://%s:%d; studies %s (%d images, %d labelled)", state.engine.predictor.loaded.checkpoint, classes,
             settings.host, settings.port, state.studies.root, len(state.studies.ids()), len(state.studies.labelled()))  # fmt: skip
    uvicorn.run(create_app(state), host=settings.host, port=settings.port, log_level="info")
