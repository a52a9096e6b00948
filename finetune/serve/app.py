"""``samtune serve``: a checkpoint behind the part of MONAI Label's REST API that 3D Slicer's MONAI
Label module and OHIF's MONAI Label extension call (MONAI Label 0.8.5: its ``endpoints/`` and the
Slicer module's ``MONAILabelLib/client.py``), so those viewers use a samtune checkpoint unchanged.

Routes: ``GET /info/``; ``GET /auth/``, ``POST /auth/token``, ``GET /auth/token/valid``;
``POST /infer/{auto|clicks}``; ``PUT /session/``, ``GET``/``DELETE /session/{id}``;
``GET /datastore/``, ``PUT /datastore/`` and ``/datastore/image``, ``GET /datastore/image``,
``PUT``/``GET /datastore/label``; ``POST /activelearning/{strategy}``; ``POST``/``GET``/``DELETE /train/``.
Models: ``auto`` (type ``segmentation``: every class, no input) and ``clicks`` (type ``deepgrow``,
3D: foreground/background clicks correcting one class, starting from the automatic proposal).

Errors are JSON ``{"detail": "<field>: <problem>", "field": ...}`` with a 4xx status; anything
unexpected is a 500 without a traceback (logged on the server), and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask

from samtune import SamtuneError
from samtune.finetune.serve import active
from samtune.finetune.serve.auth import Auth
from samtune.finetune.serve.errors import BadRequest, NotFound, RequestError
from samtune.finetune.serve.requests import InferParams, parse_json
from samtune.finetune.serve.sessions import Sessions
from samtune.finetune.serve.paths import check_id
from samtune.finetune.serve.studies import FINAL, Studies
from samtune.finetune.serve.training import TrainJob
from samtune.finetune.serve.volumes import receive, write_result

log = logging.getLogger(__name__)
MODELS = ("auto", "clicks")


@dataclass
class ServeState:
    """What one server holds: the model, the studies folder, sessions, auth, the training job."""

    engine: object  # samtune.finetune.serve.engine.ServeModel
    studies: Studies
    sessions: Sessions
    auth: Auth
    train: TrainJob
    max_upload_bytes: int
    version: str = ""


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="samtune serve", description="MONAI Label's REST protocol for a samtune checkpoint", version=state.version)
    app.state.serve = state
    app.state.scores = {}  # least_confident's uncertainty per (image file, mtime)
    _errors(app)
    _limit_uploads(app, state.max_upload_bytes)

    def authorized(request: Request) -> None:
        state.auth.check_header(request.headers.get("authorization"))

    guarded = [Depends(authorized)]
    _info_routes(app, state, guarded)
    _session_routes(app, state, guarded)
    _datastore_routes(app, state, guarded)
    _learning_routes(app, state, guarded)
    return app


def _info_routes(app: FastAPI, state: ServeState, guarded: list) -> None:
    """``/info/``, MONAI Label's login flow and ``/infer``."""

    @app.get("/info/")
    def info():
        return _info(state)

    @app.get("/auth/")
    def auth_enabled():
        return state.auth.info()

    @app.post("/auth/token")
    def auth_token(username: str = Form(""), password: str = Form("")):
        return state.auth.login(username, password)

    @app.get("/auth/token/valid", dependencies=guarded)
    def auth_valid():
        return {"username": "samtune", "roles": ["user", "annotator", "admin"]}

    @app.post("/infer/{model}", dependencies=guarded)
    def infer(model: str, image: str = "", session_id: str = "", output: str = "", params: str = Form("{}"),
              file: UploadFile | None = File(None), label: UploadFile | None = File(None)):  # fmt: skip
        return _infer(state, model, image, session_id, output, params, file)


def _session_routes(app: FastAPI, state: ServeState, guarded: list) -> None:
    @app.put("/session/", dependencies=guarded)
    def create_session(files: list[UploadFile] = File(...), expiry: int = 0):
        if len(files) != 1:
            raise BadRequest("files", f"send one volume file per session, got {len(files)}")
        upload = receive(files[0].file, files[0].filename, state.sessions.folder, state.max_upload_bytes, "files")
        session_id, session_info = state.sessions.create(upload, files[0].filename or "image.nii.gz", expiry or None)
        return {"session_id": session_id, "session_info": session_info}

    @app.get("/session/{session_id}", dependencies=guarded)
    def get_session(session_id: str, image: bool = False):
        if image:
            return FileResponse(state.sessions.image(session_id), filename="image.nii.gz")
        return _public_session(state.sessions.get(session_id))

    @app.delete("/session/{session_id}", dependencies=guarded)
    def remove_session(session_id: str):
        path = state.sessions.image(session_id)
        with state.engine.lock:
            state.engine.forget(path)
        return _public_session(state.sessions.remove(session_id))


def _datastore_routes(app: FastAPI, state: ServeState, guarded: list) -> None:
    @app.get("/datastore/", dependencies=guarded)
    def datastore(output: str = "stats"):
        if output == "all":
            return state.studies.json()
        if output == "train":
            return state.studies.datalist()
        return state.studies.status()

    @app.put("/datastore/", dependencies=guarded, include_in_schema=False)  # the older route the Slicer module still calls
    @app.put("/datastore/image", dependencies=guarded)
    def add_image(image: str = "", params: str = Form("{}"), file: UploadFile = File(...)):
        image_id = check_id(image or _stem(file.filename), "image")
        parse_json(params, "params")
        upload = receive(file.file, file.filename, state.studies.meta_dir / "uploads", state.max_upload_bytes, "file")
        state.studies.add_image(image_id, upload)
        return {"image": image_id}

    @app.get("/datastore/image", dependencies=guarded)
    def download_image(image: str):
        return FileResponse(state.studies.existing_image(image), filename=f"{image}.nii.gz")

    @app.put("/datastore/label", dependencies=guarded)
    def save_label(image: str, tag: str = "", params: str = Form("{}"), label: UploadFile = File(...)):
        tag = check_id(tag or FINAL, "tag")  # MONAI Label: a label without a tag is final
        label_names = _label_names(parse_json(params, "params"))
        state.studies.existing_image(image)
        upload = receive(label.file, label.filename, state.studies.meta_dir / "uploads", state.max_upload_bytes, "label")
        try:
            state.studies.save_label(image, tag, upload, label_names)
        finally:
            upload.unlink(missing_ok=True)
        return {"image": image, "label": image, "tag": tag}

    @app.get("/datastore/label", dependencies=guarded)
    def download_label(label: str, tag: str = FINAL):
        path = state.studies.label_path(label, check_id(tag, "tag"))
        if not path.is_file():
            raise NotFound("label", f"no {tag!r} label for image {label!r}")
        return FileResponse(path, filename=f"{label}.nii.gz")


def _learning_routes(app: FastAPI, state: ServeState, guarded: list) -> None:
    """Active learning and retraining."""

    @app.post("/activelearning/{strategy}", dependencies=guarded)
    async def next_sample(strategy: str, request: Request):
        body = await request.body()
        params = parse_json(body.decode() or "{}", "body")
        with state.engine.lock:
            sample = active.choose(strategy, state.studies, state.engine, params, app.state.scores)
        if sample:
            state.studies.update_info(sample["id"], "image", {"strategy": {strategy: {"client_id": params.get("client_id")}}})
        return sample

    @app.post("/train/", dependencies=guarded)
    @app.post("/train/{model}", dependencies=guarded)
    async def train_start(request: Request, model: str = "samtune"):
        body = await request.body()
        return state.train.start(parse_json(body.decode() or "{}", "body"))

    @app.get("/train/", dependencies=guarded)
    def train_status(check_if_running: bool = False):
        if check_if_running:
            if not state.train.running():
                return JSONResponse({"detail": "no training run is going"}, status_code=404)
            return state.train.status()
        status = state.train.status()
        if status is None:
            return JSONResponse({"detail": "no training run yet (POST /train/ starts one)"}, status_code=404)
        return status

    @app.delete("/train/", dependencies=guarded)
    def train_stop():
        return state.train.stop()


def _info(state: ServeState) -> dict:
    engine = state.engine
    labels = engine.label_names
    models = {
        "clicks": {"type": "deepgrow", "labels": labels, "dimension": 3, "config": {},
                   "description": "foreground/background clicks correct one class (the segment's name), starting from the automatic proposal"},
    }  # fmt: skip
    if engine.automatic_mode:
        models = {"auto": {"type": "segmentation", "labels": labels, "dimension": 3, "config": {},
                           "description": "every class of the checkpoint, no input"}, **models}  # fmt: skip
    return {
        "name": "samtune", "description": f"samtune checkpoint {engine.predictor.loaded.checkpoint.name}", "version": state.version,
        "labels": list(labels), "models": models, "trainers": state.train.config(),
        "strategies": {k: {"description": v} for k, v in active.STRATEGIES.items()}, "scoring": {}, "train_stats": {},
        "datastore": state.studies.status(),
    }  # fmt: skip


def _infer(state: ServeState, model: str, image: str, session_id: str, output: str, params: str, file) -> Response:
    if model not in MODELS:
        raise NotFound("model", f"{model!r} is not a model of this server ({', '.join(MODELS)})")
    if output not in ("", "image", "json", "all"):
        raise BadRequest("output", f"{output!r}: one of image, json, all")
    request = InferParams.parse(params, model)
    upload = None
    if session_id:
        path = state.sessions.image(session_id)
    elif file is not None:
        upload = path = receive(file.file, file.filename, state.sessions.folder, state.max_upload_bytes, "file")
    elif image:
        path = state.studies.existing_image(image)
    else:
        raise BadRequest("image", "name an image of the datastore, a session_id, or send the volume as 'file'")
    try:
        with state.engine.lock:
            if model == "auto":
                values, timing = state.engine.automatic(path)
            else:
                values, timing = state.engine.clicks(path, request.label, request.foreground, request.background, request.roi)
        name = f"samtune_{model}_{secrets.token_hex(4)}{request.result_extension}"
        result = write_result(values, path, state.sessions.folder / name)
    finally:
        if upload is not None:
            upload.unlink(missing_ok=True)
            with state.engine.lock:
                state.engine.forget(upload)
    label_names = state.engine.label_names if model == "auto" else {request.label: 1}
    answer = {"label_names": label_names, "latencies": timing, "model": model}
    cleanup = BackgroundTask(result.unlink, missing_ok=True)
    if output == "json":
        result.unlink(missing_ok=True)
        return JSONResponse(answer)
    if output == "image":
        return FileResponse(result, filename=result.name, background=cleanup)
    body, content_type = multipart({"params": json.dumps(answer)}, {"image": (result.name, result.read_bytes())})
    result.unlink(missing_ok=True)
    return Response(body, media_type=content_type)


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body, as MONAI Label answers ``/infer`` (``params`` JSON + the label
    file). Written here: the encoders that exist live in HTTP clients (requests, urllib3), which a
    server should not depend on for eight lines of RFC 7578."""
    boundary = secrets.token_hex(16)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\nContent-Type: application/json\r\n\r\n'.encode() + value.encode())
    for name, (filename, data) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        parts.append(head.encode() + data)
    body = b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _label_names(params: dict) -> dict[str, int] | None:
    """``label_info`` [{"name", "idx"}] (the Slicer module also sends "id") -> {name: file value}."""
    info = params.get("label_info")
    if info is None:
        return None
    if not isinstance(info, list):
        raise BadRequest("params.label_info", "a list of {\"name\": segment, \"idx\": value in the label file}")
    out = {}
    for i, item in enumerate(info):
        value = item.get("idx", item.get("id")) if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(value, int):
            raise BadRequest(f"params.label_info[{i}]", f"{item!r}: give {{\"name\": segment, \"idx\": value}}")
        out[item["name"]] = value
    return out


def _stem(filename: str | None) -> str:
    name = Path(filename or "").name
    for suffix in (".nii.gz", ".nii", ".nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _public_session(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "path"}  # the server's folders stay on the server


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(SamtuneError)
    async def samtune_error(request: Request, exc: SamtuneError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(problems), "field": ".".join(str(p) for p in exc.errors()[0]["loc"][1:])}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the details"}, status_code=500)


def _limit_uploads(app: FastAPI, limit: int) -> None:
    """Refuse a body whose Content-Length is over ``limit`` (413) before it is read into temporary
    files; a chunked upload without one is cut at ``limit`` when it is copied (``volumes.receive``)."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + (1 << 20):  # 1 MiB for the form fields
            return JSONResponse({"detail": f"upload: larger than the server's limit of {limit // 2**20} MiB (samtune serve --max-upload-mb)",
                                 "field": "upload"}, status_code=413)  # fmt: skip
        return await call_next(request)
