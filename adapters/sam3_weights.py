"""SAM 3's weights into samtune's ``Sam3Segmenter``: a Hugging Face folder of ``Sam3VideoModel``
(or the hub id, downloaded when online) and Meta's own ``sam3.pt`` (converted in memory by
adapters/sam3_checkpoints.py), both through one strict loader; the family (adapters/sam3.py)
chooses which from ``model.checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

from samtune.adapters.catalog import ModelVariant
from samtune.adapters.checkpoint_files import load_exactly, load_state_dict_file
from samtune.adapters.sam3_checkpoints import convert_official
from samtune.adapters.sam3_config import ByteTokenizer, HubTokenizer, released_config, with_image_size
from samtune.adapters.sam3_model import SAMTUNE_ONLY, Sam3Segmenter, identity_projection, samtune_key
from samtune.adapters.sam3_video import RELEASED_PREFIX
from samtune.errors import SamtuneError


def weight_files(source: str, name: str) -> tuple[Path, list[Path]]:
    """(folder, safetensors files) of a local folder, a single file, or a hub id (downloaded when online)."""
    path = Path(source)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        if path.is_absolute() or source.startswith("."):
            raise SamtuneError(f"model.checkpoint={source!r}: no such folder; check the path.")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as exc:  # offline, unknown hub id: huggingface_hub raises several types
            raise SamtuneError(
                f"could not load SAM 3 weights for model.name={name!r} from {source!r} ({type(exc).__name__}); set model.checkpoint "
                f"to a local Hugging Face folder (e.g. a `huggingface-cli download {source}` copy), or run online so the hub id can be downloaded."
            ) from None
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise SamtuneError(f"{path}: not a Hugging Face folder of SAM 3 (needs config.json and *.safetensors).")
    return path, files


def released_tensors(files: list[Path], prefix: str):
    """(key, tensor) of every weight under ``prefix`` in safetensors files, reading no other tensor."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    yield key, handle.get_tensor(key)


def load_released(source: str, name: str, image_size: int) -> Sam3Segmenter:
    """A SAM 3 folder in the released layout (``Sam3VideoModel``'s keys) -> Sam3Segmenter, every
    image-model weight from the files (``load_exactly``), the tracker's memory modules left out."""
    from safetensors.torch import load_file
    from transformers import Sam3VideoConfig

    folder, files = weight_files(source, name)
    try:
        config = Sam3VideoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise SamtuneError(f"{folder}/config.json: not a SAM 3 (sam3_video) configuration ({exc}).") from None
    model = Sam3Segmenter(with_image_size(config, image_size))
    released = (item for file in files for item in load_file(str(file)).items())
    load_released_weights(model, released, str(folder), f"SAM 3 of model.name={name!r} (released Sam3VideoModel key names)",
                          "Use an unmodified facebook/sam3 folder.")  # fmt: skip
    model.text_tokenizer = HubTokenizer(str(folder))
    return model


def load_official(path: Path, variant: ModelVariant, image_size: int) -> Sam3Segmenter:
    """Meta's ``sam3.pt`` -> Sam3Segmenter: read without running code (``weights_only``), converted to
    the released layout (adapters/sam3_checkpoints.py), then loaded exactly as a released folder. The
    architecture is the variant's (``sam3``: the release's defaults); the file holds no tokenizer."""
    released, unknown = convert_official(load_state_dict_file(path))  # a bad file fails before the model is built
    config = variant.make_config(image_size) if variant.make_config is not None else released_config(image_size)
    model = Sam3Segmenter(config)
    load_released_weights(model, released.items(), str(path), f"SAM 3 of model.name={variant.name!r} (Meta's sam3.pt, converted)",
                          "Use an unmodified sam3.pt, or a Hugging Face folder of facebook/sam3.", unknown)  # fmt: skip
    # random variants tokenise bytes; the release's CLIP tokenizer files live beside the hub's weights
    model.text_tokenizer = ByteTokenizer() if variant.make_config is not None else HubTokenizer(variant.hub_id or "facebook/sam3")
    return model


def load_released_weights(model: Sam3Segmenter, released, source: str, what: str, fix: str, unknown=()) -> None:
    """(key, tensor) pairs in the released layout -> ``model``, every image-model weight accounted
    for (``load_exactly``); the tracker's memory modules (``tracker_model.memory_*`` ...) are the
    video model's and left out here."""
    state, unknown = {}, list(unknown)
    for key, value in released:
        own = samtune_key(key)
        if own is not None:
            state[own] = value
        elif not key.startswith(RELEASED_PREFIX):
            unknown.append(key)
    for key, value in model.state_dict().items():  # samtune's own modules keep their init
        if key.startswith(SAMTUNE_ONLY):
            state[key] = value
    load_exactly(model, state, source, what, fix, unknown=unknown, assign=False)
    identity_projection(model.detector.class_projection)
