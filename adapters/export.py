"""Exporting a fine-tuned model to the tools people use: a merged transformers folder, an official
SAM ``.pth`` (so an organ model drops into any SAM-based tool), or ONNX.

LoRA is merged into the base weights first (peft ``merge_and_unload``), so every export is a plain
SAM with no adapter code needed to run it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import PeftModel
from transformers import SamModel

from samtune import SamtuneError
from samtune.adapters.official import hf_to_official_state_dict

EXPORT_FORMATS = ("hf", "sam-pth", "onnx")
ONNX_ENCODER_FILE = "image_encoder.onnx"
ONNX_DECODER_FILE = "prompt_decoder.onnx"


def merge_model(model: PeftModel | SamModel) -> SamModel:
    """A plain SamModel with LoRA folded into the weights (the input model is not modified)."""
    if isinstance(model, PeftModel):
        import copy

        return copy.deepcopy(model).merge_and_unload().eval()
    return model.eval()


def export_hf(model: SamModel, out: Path) -> list[Path]:
    """A transformers folder: ``SamModel.from_pretrained(out)`` loads it."""
    model.save_pretrained(out, safe_serialization=True)
    return [out / "config.json", out / "model.safetensors"]


def export_sam_pth(model: SamModel, out: Path) -> list[Path]:
    """Weights in the official ``segment_anything`` key layout (``sam_model_registry[...](checkpoint=out)``)."""
    state = hf_to_official_state_dict({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return [out]


class _ImageEncoder(torch.nn.Module):
    """B×3×S×S normalised pixels -> B×C×g×g image embeddings."""

    def __init__(self, model: SamModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_embeddings(pixel_values)


class _PromptDecoder(torch.nn.Module):
    """Image embeddings + one box per image (B×1×4, xyxy input px) -> low-res logits, IoU predictions."""

    def __init__(self, model: SamModel):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, input_boxes):
        out = self.model(image_embeddings=image_embeddings, input_boxes=input_boxes, multimask_output=False)
        return out.pred_masks[:, 0], out.iou_scores[:, 0]  # B×1×s×s, B×1


def onnx_example_inputs(model: SamModel, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.vision_config.image_size
    pixels = torch.zeros(batch, 3, size, size)
    boxes = torch.tensor([[[0.25 * size, 0.25 * size, 0.75 * size, 0.75 * size]]]).repeat(batch, 1, 1)
    return pixels, boxes


def export_onnx(model: SamModel, out: Path) -> list[Path]:
    """Two ONNX files in folder ``out``: the image encoder (run once per image) and the prompt
    encoder + mask decoder (run per prompt), as SAM is deployed."""
    out.mkdir(parents=True, exist_ok=True)
    pixels, boxes = onnx_example_inputs(model)
    encoder = _ImageEncoder(model).eval()
    with torch.no_grad():
        embeddings = encoder(pixels)
    # The TorchScript-based exporter: the dynamo exporter needs onnxscript, one more dependency.
    common = dict(dynamo=False, opset_version=17)
    torch.onnx.export(
        encoder, (pixels,), out / ONNX_ENCODER_FILE, input_names=["pixel_values"], output_names=["image_embeddings"],
        dynamic_axes={"pixel_values": {0: "batch"}, "image_embeddings": {0: "batch"}}, **common,
    )  # fmt: skip
    torch.onnx.export(
        _PromptDecoder(model).eval(), (embeddings, boxes), out / ONNX_DECODER_FILE,
        input_names=["image_embeddings", "input_boxes"], output_names=["low_res_masks", "iou_predictions"],
        dynamic_axes={"image_embeddings": {0: "batch"}, "input_boxes": {0: "batch"},
                      "low_res_masks": {0: "batch"}, "iou_predictions": {0: "batch"}}, **common,
    )  # fmt: skip
    return [out / ONNX_ENCODER_FILE, out / ONNX_DECODER_FILE]


def export_model(model: PeftModel | SamModel, fmt: str, out: str | Path) -> list[Path]:
    if fmt not in EXPORT_FORMATS:
        raise SamtuneError(f"--format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}.")
    out = Path(out)
    merged = merge_model(model)
    if fmt == "hf":
        return export_hf(merged, out)
    if fmt == "sam-pth":
        if out.suffix not in {".pth", ".pt"}:
            raise SamtuneError(f"--out {out}: an official SAM checkpoint is a .pth file, e.g. --out organ_sam.pth.")
        return export_sam_pth(merged, out)
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise SamtuneError("--format onnx needs the onnx extra: pip install 'samtune[onnx]'.") from None
    return export_onnx(merged, out)
