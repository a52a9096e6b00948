"""Request bodies checked at the edge: ``params`` of ``/infer`` as a pydantic model, so a
malformed click is a 4xx naming ``params.<field>``, never an error deep in the model code."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from samtune.finetune.serve.errors import BadRequest

Point = list[float]  # [i, j, k] voxel indices of the image file


def parse_json(text: str, field: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise BadRequest(field, f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise BadRequest(field, f"a JSON object is expected, got {type(value).__name__}")
    return value


class InferParams(BaseModel):
    """What the viewers send in ``params`` (other keys, e.g. ``client_id``, are accepted and unused)."""

    model_config = ConfigDict(extra="allow")
    label: str | None = None  # clicks: the class (the segment's name)
    foreground: list[Point] = []
    background: list[Point] = []
    roi: list[float] | None = None  # [i0, i1, j0, j1, k0, k1]
    result_extension: Literal[".nii.gz", ".nrrd"] = ".nii.gz"

    @field_validator("foreground", "background")
    @classmethod
    def _three(cls, points: list[Point]) -> list[Point]:
        for i, p in enumerate(points):
            if len(p) != 3:
                raise ValueError(f"point {i} is {p}: a click is [i, j, k] (voxel indices of the image file)")
        return points

    @classmethod
    def parse(cls, text: str, model: str) -> "InferParams":
        raw = parse_json(text, "params")
        if raw.get("result_extension") in (None, ""):
            raw.pop("result_extension", None)
        try:
            params = cls.model_validate(raw)
        except ValidationError as exc:
            e = exc.errors()[0]
            raise BadRequest("params." + ".".join(str(p) for p in e["loc"]), e["msg"]) from None
        if model == "clicks" and not params.label:
            raise BadRequest("params.label", "the class to correct (the segment's name) is missing")
        return params
