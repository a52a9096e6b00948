"""The model-family seam: everything trainer, evaluation, export (and prediction) ask of a model.

A *family* is one architecture (SAM v1 through transformers today; MobileSAM or SAM 2 later) and
knows how to build it, preprocess an image for it, encode images, decode prompts into low-res
logits, map logits back to the original image, where LoRA goes by role, and what trains in each
``train.mode``. A *variant* is a named, registered configuration of a family (``tiny``,
``sam-vit-base``, ...; ``samtune.adapters.registry``). Callers hold a family object and never
touch a model's module names themselves.

This module is the interface only and imports no implementation. Families register themselves
with ``@register_family`` (adapters/catalog.py, which imports the built-in family modules by name
on the first ``get_family``); the test suite builds the tiny variant of every registered family,
runs a prompted forward/backward, applies every LoRA preset and round-trips an adapter folder
(tests/unit/adapters/test_family.py).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

# the family table is the catalog's (a leaf); re-exported where callers have always found it
from samtune.adapters.catalog import get_family, list_families, register_family  # noqa: F401
from samtune.errors import SamtuneError
from samtune.suggest import did_you_mean

if TYPE_CHECKING:
    from samtune.adapters.catalog import ModelVariant


@dataclass
class ImageEmbeddings:
    """What the image encoder hands to the decoder, one row per image (or per prompt after
    ``repeat_interleave``): ``image_embeddings`` N×C×g×g, and the other feature maps the family's
    decoders read (empty for SAM v1; SAM 2: two finer maps; SAM 3: those two, then its concept
    detector's three neck maps)."""

    image_embeddings: torch.Tensor
    high_res_features: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def repeat_interleave(self, repeats: int) -> "ImageEmbeddings":
        if repeats == 1:
            return self
        return ImageEmbeddings(
            self.image_embeddings.repeat_interleave(repeats, 0),
            tuple(f.repeat_interleave(repeats, 0) for f in self.high_res_features),
        )


class ClassPrompts(torch.nn.Module):
    """The automatic mode's learnt prompts: ``tokens`` K×T×C, T prompt tokens per class, read by
    the mask decoder exactly where a box's two corner embeddings would be (the sparse prompt).

    One prompt per class instead of per-class mask tokens keeps the decoder untouched, so the same
    decoder (and adapter folder) still answers boxes and clicks, and a class prompt can be
    combined with clicks for corrections. The module sits on the base model as the top-level
    submodule ``class_prompts``; in ``lora`` mode peft saves it with the mask decoder
    (``modules_to_save``) in ``adapter_model.safetensors``.
    """

    def __init__(self, n_classes: int, n_tokens: int, dim: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # unit scale, like SAM's point/corner embeddings (nn.Embedding's N(0, 1)) the decoder already reads
        self.tokens = torch.nn.Parameter(torch.randn(n_classes, n_tokens, dim, generator=generator))

    def forward(self) -> torch.Tensor:
        return self.tokens


CLASS_PROMPTS = "class_prompts"  # the base model's attribute holding ClassPrompts (automatic mode)


def sparse_with_class_tokens(prompt_encoder, class_tokens: torch.Tensor, n: int, boxes=None, points=None, point_labels=None) -> torch.Tensor:
    """N×1×(P+T)×C sparse prompt: the clicks' (and box's) embeddings from SAM's / SAM 2's prompt
    encoder, then the class prompt's T tokens (``class_tokens`` N×T×C or T×C).

    The class prompt takes a box's place, as in ``decode_classes``: clicks given with a box carry
    no padding token, so the not-a-point token the prompt encoder appends to clicks without a box
    is dropped (both encoders append it last)."""
    has_points = points is not None and points.shape[1] > 0
    tokens = class_tokens if class_tokens.dim() == 3 else class_tokens[None]
    if not has_points and boxes is None:
        return tokens.expand(n, -1, -1)[:, None]
    sparse, _ = prompt_encoder(
        input_points=points[:, None] if has_points else None, input_labels=point_labels[:, None] if has_points else None,
        input_boxes=boxes[:, None] if boxes is not None else None, input_masks=None,
    )  # fmt: skip
    if boxes is None:
        sparse = sparse[:, :, :-1]
    return torch.cat([sparse, tokens.to(sparse.dtype).expand(n, -1, -1)[:, None]], dim=2)


def dense_prompt(prompt_encoder, mask_inputs: torch.Tensor | None, n: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """N×C×g×g dense prompt: the embedded mask prompt (N×1×s×s low-res logits), else the
    ``no_mask_embed`` vector at every position (what the prompt encoders do)."""
    if mask_inputs is not None:
        return prompt_encoder.mask_embed(mask_inputs)
    return prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *grid_hw)


def decode_with_class_tokens(decode: Callable, model, embeddings: "ImageEmbeddings", class_tokens: torch.Tensor, boxes=None, points=None,
                             point_labels=None, mask_inputs=None, multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A class prompt with clicks (a correction, ``decode_prompts(class_tokens=...)``) through a
    SAM-style mask decoder: sparse = clicks (and box) + the class tokens, dense = the mask prompt.
    ``decode(model, embeddings, sparse, dense, multimask_output)`` -> (N×P×M×s×s, N×P×M), the
    family's own decoder call; returns the one prompt row, N×M×s×s and N×M."""
    image = embeddings.image_embeddings
    sparse = sparse_with_class_tokens(model.prompt_encoder, class_tokens, len(image), boxes, points, point_labels)
    dense = dense_prompt(model.prompt_encoder, mask_inputs, len(image), image.shape[-2:])
    low_res, iou = decode(model, embeddings, sparse.to(image.dtype), dense, multimask_output)
    return low_res[:, 0], iou[:, 0]


def check_text_init(family: "ModelFamily") -> None:
    """``automatic.init: text`` needs a family with a text encoder; the error names those that have one."""
    if not family.has_text_encoder:
        having = [n for n in list_families() if get_family(n).has_text_encoder]
        raise SamtuneError(f"automatic.init=text: the {family.name} family has no text encoder to read class names with; "
                           f"use automatic.init=random, or a family that has one ({', '.join(having) or 'none registered'}).")  # fmt: skip


class ModelFamily(ABC):
    """The interface (abstract methods: what a new family must implement); ``SamFamily``
    (adapters/sam.py) is the first implementation.

    Module-name attributes are the top-level submodules of the built model (and of a peft-wrapped
    one, under peft's prefix): ``image_encoder`` is frozen in ``lora``/``decoder_only`` modes,
    ``mask_decoder`` trains in both, ``prompt_modules`` stay frozen unless ``full``.
    """

    name: str = ""
    image_encoder: str = ""
    mask_decoder: str = ""
    prompt_modules: tuple[str, ...] = ()
    lora_roles: dict[str, str] = {}  # role (samtune.constants.LORA_ROLES) -> module-name regex
    encoder_block: re.Pattern | None = None  # captures the block index of an encoder module name
    attention_kinds: tuple[str, ...] = ("sdpa",)  # `model.attention` values; the first is the default
    lora_module_types: tuple[type, ...] = (torch.nn.Linear,)  # what LoRA may wrap (EdgeTAM's RepViT: also 1×1 Conv2d)
    input_multiple: int = 1  # model.image_size must be a multiple of this (SAM 3: its 14 px patches)

    # --- building and files ---
    @abstractmethod
    def build(self, variant: "ModelVariant", checkpoint: str | None, image_size: int, init_seed: int) -> torch.nn.Module:
        ...

    @abstractmethod
    def load_full(self, folder) -> torch.nn.Module:
        """A whole model saved with ``save_pretrained`` (``train.mode`` decoder_only / full)."""
        ...

    @abstractmethod
    def encoder_depth(self, model) -> int:
        ...

    def set_attention(self, model, kind: str) -> None:
        """Switch the image encoder's attention implementation (``model.attention``) in place; every
        kind gives the same numbers up to rounding. A family with one kind accepts only that one."""
        if kind not in self.attention_kinds:
            raise SamtuneError(f"model.attention={kind!r}: the {self.name} family has {', '.join(self.attention_kinds)}.")

    # --- data in and out ---
    @abstractmethod
    def make_transform(self, image_size: int) -> Callable:
        """The preprocessing of an H×W×3 uint8 image (+ label map) into model input; the object
        also has ``resized_shape(original_hw)`` (the geometry to undo) and ``image_size``."""
        ...

    @abstractmethod
    def encode_images(self, model, pixel_values: torch.Tensor) -> ImageEmbeddings:
        """B×3×S×S preprocessed images -> embeddings, with gradients where LoRA needs them."""
        ...

    @abstractmethod
    def decode_prompts(
        self,
        model,
        embeddings: ImageEmbeddings,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        class_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt per embedding row: ``boxes`` N×4 xyxy, ``points`` N×K×2 (x, y) with
        ``point_labels`` N×K (1, 0, -1 padding), ``mask_inputs`` N×1×s×s low-res logits;
        coordinates in input px. Returns N×M×s×s low-res logits and N×M predicted IoU.

        ``class_tokens`` (N×T×C, or T×C for every row): a class prompt (one class of the model's
        ``ClassPrompts``) in the same sparse prompt as the clicks, where a box's corners would be
        (``sparse_with_class_tokens``): corrections that start from the automatic result. With no
        click, box or mask prompt it decodes exactly as ``decode_classes`` does for that class."""
        ...

    @abstractmethod
    def decode_classes(self, model, embeddings: ImageEmbeddings, class_tokens: torch.Tensor) -> torch.Tensor:
        """Automatic mode: every class prompt on every image. ``class_tokens`` K×T×C (the model's
        ``ClassPrompts``); returns B×K×s×s low-res logits, one mask per class and image."""
        ...

    @abstractmethod
    def prompt_dim(self, model) -> int:
        """Width C of the decoder's prompt tokens (what ``ClassPrompts`` must produce)."""
        ...

    has_text_encoder: bool = False  # ``text_embeddings`` answers: ``automatic.init: text`` is possible

    def text_embeddings(self, model, names: list[str], n_tokens: int) -> torch.Tensor | None:
        """K×T×C class prompts read from the family's text encoder for the class ``names``
        (``automatic.init: text``); None: the family has no text encoder."""
        return None

    def add_class_prompts(self, model, n_classes: int, n_tokens: int, seed: int = 0, class_names: list[str] | None = None,
                          init: str = "random") -> None:  # fmt: skip
        """Give a base model its automatic-mode prompts (before peft wraps it or a checkpoint loads).
        ``init``: ``random`` (N(0, 1), seeded) or ``text`` (``text_embeddings`` of ``class_names``);
        a checkpoint's values replace either when it loads, so loaders need only the shapes."""
        prompts = ClassPrompts(n_classes, n_tokens, self.prompt_dim(model), seed)
        if init == "text":
            check_text_init(self)
            if class_names is None or len(class_names) != n_classes:
                raise SamtuneError(f"automatic.init=text needs one name per class ({n_classes}), got {class_names!r}.")
            tokens = self.text_embeddings(model, list(class_names), n_tokens)
            with torch.no_grad():
                prompts.tokens.copy_(tokens.to(prompts.tokens.dtype))
        elif init != "random":
            raise SamtuneError(f"automatic.init={init!r}: use random or text.")
        setattr(model, CLASS_PROMPTS, prompts)

    def upscale_logits(self, low_res: torch.Tensor, image_size: int) -> torch.Tensor:
        """N×M×s×s -> N×M×S×S logits in the padded input frame."""
        return F.interpolate(low_res, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def logits_to_original(self, logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> torch.Tensor:
        """C×S×S input-frame logits -> C×H×W logits of the original image (crop the padding,
        resize); a 1×S×S input gives H×W."""
        h, w = resized_hw
        cropped = logits[None, :, :h, :w]
        out = F.interpolate(cropped, size=tuple(original_hw), mode="bilinear", align_corners=False)[0]
        return out[0] if len(out) == 1 else out

    @abstractmethod
    def export(self, model, fmt: str, out) -> list:
        """Write a (merged) model in one of ``export_formats``; returns the files written."""
        ...

    export_formats: tuple[str, ...] = ()

    # --- volumes ---
    def video_model(self, model, variant: "ModelVariant", checkpoint: str | None):
        """A tracker with memory that carries one prompted slice through a volume as through video
        frames (SAM 2's video model), holding ``model``'s weights (LoRA merged); ``variant`` and
        ``checkpoint`` (the recipe's base weights) say where the memory modules come from. None: the
        family has no memory, and volumes are followed slice by slice with boxes
        (samtune.finetune.propagation)."""
        return None

    # --- what trains ---
    def trainable_modules(self, mode: str, model=None) -> tuple[str, ...]:
        """Top-level modules trained in full in ``train.mode`` (``lora``: besides the LoRA
        matrices, saved in the adapter folder); ``("",)`` = the whole model. The class prompts
        of an automatic model (when ``model`` has them) always train."""
        extra = (CLASS_PROMPTS,) if model is not None and hasattr(model, CLASS_PROMPTS) else ()
        return {"lora": (self.mask_decoder, *extra), "decoder_only": (self.mask_decoder, *extra), "full": ("",)}[mode]

    def lora_patterns(self, roles: tuple[str, ...]) -> str:
        unknown = [r for r in roles if r not in self.lora_roles]
        if unknown:
            raise SamtuneError(
                f"adapter.lora.preset: role {unknown[0]!r} is not available for model family {self.name!r}; "
                f"{did_you_mean(unknown[0], self.lora_roles)}(roles: {', '.join(self.lora_roles)})"
            )
        return "|".join(f"(?:{self.lora_roles[r]})" for r in roles)

    def block_index(self, module_name: str, model=None) -> int | None:
        """The encoder block a module of ``model`` belongs to, counted as ``adapter.lora.blocks``
        counts them (None: not in an encoder block)."""
        m = self.encoder_block.search(module_name) if self.encoder_block else None
        return int(m.group(1)) if m else None

    def component_of(self, parameter_name: str) -> str:
        """Which part a parameter belongs to, for the parameter table (peft prefixes allowed)."""
        if f"{CLASS_PROMPTS}." in parameter_name:
            return CLASS_PROMPTS
        if "lora_" in parameter_name:
            return "encoder_lora" if f"{self.image_encoder}." in parameter_name else "decoder_lora"
        if f"{self.mask_decoder}." in parameter_name:
            return "mask_decoder"
        if f"{self.image_encoder}." in parameter_name:
            return "image_encoder"
        return "prompt_encoder"



class PromptTokenFamily(ModelFamily):
    """Families whose model is called as transformers' ``SamModel`` / ``Sam2Model`` are (image
    embeddings + boxes, points, mask) and whose mask decoder takes sparse prompt tokens: SAM,
    MobileSAM, SAM 2, EdgeTAM. Class prompts are sparse tokens of that decoder; a subclass says
    what its forward takes as image embeddings and how its mask decoder is called."""

    @staticmethod
    @abstractmethod
    def _forward_embeddings(embeddings: ImageEmbeddings):
        """What the model's forward takes as ``image_embeddings``."""

    @staticmethod
    @abstractmethod
    def _decode(model, embeddings: ImageEmbeddings, sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool):
        """B×P×T×C sparse and B×C×g×g dense prompts on ``embeddings`` -> (B×P×M×s×s, B×P×M)."""

    def decode_prompts(self, model, embeddings, boxes=None, points=None, point_labels=None, mask_inputs=None, multimask_output=False,
                       class_tokens=None):  # fmt: skip
        if class_tokens is not None:  # a class prompt with clicks: sparse prompt built here, then the decoder
            return decode_with_class_tokens(self._decode, model, embeddings, class_tokens, boxes, points, point_labels, mask_inputs, multimask_output)
        has_points = points is not None and points.shape[1] > 0
        out = model(
            image_embeddings=self._forward_embeddings(embeddings),
            input_boxes=boxes[:, None] if boxes is not None else None,  # one prompt per embedding row
            input_points=points[:, None] if has_points else None,
            input_labels=point_labels[:, None] if has_points else None,
            input_masks=mask_inputs,
            multimask_output=multimask_output,
        )
        return out.pred_masks[:, 0], out.iou_scores[:, 0]

    def decode_classes(self, model, embeddings, class_tokens):
        """B×K×s×s: the decoder's point-batch axis carries the K classes of each image (as SamModel.forward
        runs K boxes on one image), the class tokens where a box's corner embeddings would be, no mask
        prompt (``no_mask_embed``)."""
        image = embeddings.image_embeddings
        batch = image.shape[0]
        sparse = class_tokens.to(image.dtype)[None].expand(batch, -1, -1, -1)  # B×K×T×C
        dense = dense_prompt(model.prompt_encoder, None, batch, image.shape[-2:])
        return self._decode(model, embeddings, sparse, dense, False)[0][:, :, 0]
