"""Malformed request bodies are 4xx errors naming the field."""

from __future__ import annotations

import pytest

from samtune.finetune.serve.errors import BadRequest
from samtune.finetune.serve.requests import InferParams


@pytest.mark.parametrize(("text", "field"), [
    ("{not json", "params"),
    ("[1, 2]", "params"),
    ('{"label": "liver", "foreground": [[1, 2]]}', "params.foreground"),
    ('{"label": "liver", "foreground": "here"}', "params.foreground"),
    ('{"label": "liver", "foreground": [[1, 2, 3]], "result_extension": ".png"}', "params.result_extension"),
    ('{"foreground": [[1, 2, 3]]}', "params.label"),
])  # fmt: skip
def test_bad_params_name_the_field(text, field):
    with pytest.raises(BadRequest) as info:
        InferParams.parse(text, "clicks")
    assert info.value.field == field


def test_viewer_params_are_read_and_extra_keys_kept():
    p = InferParams.parse('{"label": "liver", "foreground": [[1, 2, 3]], "background": [], "client_id": "slicer", "result_extension": ""}', "clicks")
    assert p.foreground == [[1, 2, 3]] and p.result_extension == ".nii.gz"
