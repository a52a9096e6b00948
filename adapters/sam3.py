"""SAM 3 (Meta, 2025, "SAM 3: Segment Anything with Concepts") as a model family, on transformers'
``Sam3*`` modules held in one model (``Sam3Segmenter``, adapters/sam3_model.py): the SAM 2-style
tracker answers boxes, clicks and mask prompts; the concept detector is the automatic mode.

Variants: ``sam3`` (the release, 1008 px; a Hugging Face folder or the hub id ``facebook/sam3``)
and ``sam3-tiny-random`` (random init, 5.2 M parameters, 112 px, for tests and offline runs).

Prompted path. ``encode_images`` runs the ViT once and both necks: the tracker's three maps become
``image_embeddings`` (the stride-14 map plus ``no_memory_embedding``, as ``Sam3TrackerModel``) and
the first two ``high_res_features`` (after the tracker decoder's ``conv_s0``/``conv_s1``, as SAM 2);
the detector neck's three maps follow them in ``high_res_features``. ``decode_prompts`` is
``Sam3TrackerModel``'s prompt encoder + mask decoder (N×M×4g×4g low-res logits, g = S/14). As for
SAM 2, the decoder's stability fallback is switched off so the single-mask token that training
optimises is the one evaluated.

Automatic path: one concept per class. SAM 3's detector reads a concept prompt (the text encoder's
projected token features, B×L×C) against the detector neck's maps and gives Q queries, each with
a score (dot product with the pooled prompt), a box and a mask, and a presence logit saying
whether the concept is on the image at all. samtune's class prompt k *is* that concept prompt
(``ClassPrompts`` K×T×C, C = the detector's width): with ``automatic.init: text`` it starts as the
last T token features of the class name (``sam3_config.last_tokens``: CLIP's text encoder is
causal, so the last tokens have read the whole name), then trains like every family's class
prompts. ``decode_classes`` turns the detector's instances into one B×K×4g×4g logit map per class:

    p_k(pixel) = sigmoid(presence_k) · max_q sigmoid(score_q) · sigmoid(mask_q(pixel))

returned as logit(p) (p clamped to [1e-6, 1 - 1e-6]), so the Dice + focal class loss and the
fusion rules (``automatic.threshold``, argmax over classes) apply unchanged. The max over queries
keeps SAM 3's reading (a pixel belongs to the concept if some confident instance covers it;
organs are one instance or a few), and unlike a noisy-or it does not saturate when 200 untrained
queries each add a little probability. The presence factor lets an empty slice be learnt as
"concept absent" (p → 0 everywhere) without pushing every query's mask down.

Corrections (``decode_prompts(class_tokens=...)``): alone, a class prompt decodes exactly as
``decode_classes``. With clicks, a box or a mask prompt, the tracker decodes them together with
the class prompt projected into its sparse prompt (``detector.class_projection``, identity at init
because both widths are 256 in the release; it trains with the detector), so the corrected mask
still depends on the class prompt and gradients reach it, as for SAM and SAM 2.

What trains: ``lora``/``decoder_only`` train the tracker's mask decoder, and for an automatic model
also the detector's heads (``detector``: DETR encoder/decoder, scoring, mask head, class
projection; the frozen ViT and necks are shared). The text encoder never trains: it is read once,
for ``automatic.init: text``.

Weights. A Hugging Face folder (or ``facebook/sam3`` when online) saved from ``Sam3VideoModel`` is
read with safetensors and renamed into samtune's layout (``sam3_model.samtune_key``); the tracker's
memory modules are left for the video model. Meta's own ``sam3.pt`` is read without running code
(``torch.load(weights_only=True)``), converted in memory to that same released layout
(adapters/sam3_checkpoints.py, after transformers' ``convert_sam3_video_to_hf.py``, which is not in
the wheel) and loaded by the same strict path, so a key that fits nowhere is an error naming it.
Its architecture is the variant's (``sam3``: the release's configuration); it holds no tokenizer,
so ``automatic.init: text`` reads the release's from the hub id.

Memory propagation (``video_model``): transformers' ``Sam3TrackerVideoModel`` around this model's
own ViT, tracker neck and tracker heads (shared, LoRA merged; adapters/sam3_video.py), its memory
modules read from the same released folder, hub id or ``sam3.pt``, or at random init for random
variants; a folder without them (a samtune export) is refused with ``eval.propagation=box`` as the
way out.

Export: ``hf`` writes ``Sam3Segmenter.save_pretrained`` (samtune's layout, LoRA merged; the
``Sam3VideoConfig`` in config.json). A ``Sam3VideoModel`` folder would need the memory modules.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from samtune.adapters.catalog import ModelVariant, register_family, register_model
from samtune.adapters.checkpoint_files import load_state_dict_file
from samtune.adapters.family import CLASS_PROMPTS, ImageEmbeddings, ModelFamily, decode_with_class_tokens
from samtune.adapters.sam2 import SquareResizeTransform
from samtune.adapters.sam3_checkpoints import official_to_released
from samtune.adapters.sam3_config import ByteTokenizer, last_tokens, make_tiny_sam3_config, name_features
from samtune.adapters.sam3_model import Sam3Segmenter
from samtune.adapters.sam3_video import RELEASED_PREFIX, memory_of_released, video_model_from
from samtune.adapters.sam3_weights import load_official, load_released, released_tensors, weight_files
from samtune.errors import SamtuneError

# SAM 3's image processor: resize to S×S (no padding), mean 0.5 / std 0.5 on 0-1 RGB
# (transformers' Sam3ImageProcessor: IMAGENET_STANDARD_MEAN/STD)
SAM3_MEAN = (0.5, 0.5, 0.5)
SAM3_STD = (0.5, 0.5, 0.5)
PROBABILITY_FLOOR = 1e-6  # decode_classes clamps p to [floor, 1 - floor]: logits within ±13.8

_ENCODER_BLOCK = r"vision_encoder\.backbone\.layers\.\d+\."
_DECODER_ATTENTION = (
    r"mask_decoder\.transformer\.(?:layers\.\d+\.)?"
    r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)\.(?:q|k|v|o)_proj"
)


@register_family
class Sam3Family(ModelFamily):
    """SAM 3: tracker for prompts, concept detector for classes (module docstring). LoRA roles name
    the ViT's separate q/k/v projections, its output projection and MLP, and the tracker decoder's
    two-way attention; ``adapter.lora.blocks`` counts ViT layers (32 in the release)."""

    name = "sam3"
    image_encoder = "vision_encoder"
    mask_decoder = "mask_decoder"
    prompt_modules = ("prompt_encoder", "shared_image_embedding")
    detector = "detector"
    lora_roles = {
        "encoder_attention": _ENCODER_BLOCK + r"attention\.(?:q|k|v)_proj",
        "encoder_attention_out": _ENCODER_BLOCK + r"attention\.o_proj",
        "encoder_mlp": _ENCODER_BLOCK + r"mlp\.fc(?:1|2)",
        "decoder_attention": _DECODER_ATTENTION,
    }
    encoder_block = re.compile(r"vision_encoder\.backbone\.layers\.(\d+)\.")
    attention_kinds = ("sdpa",)
    export_formats = ("hf",)
    input_multiple = 14
    has_text_encoder = True

    # --- building and files ---
    def build(self, variant: ModelVariant, checkpoint: str | None, image_size: int, init_seed: int) -> Sam3Segmenter:
        if checkpoint is None and variant.make_config is not None:
            with torch.random.fork_rng():
                torch.manual_seed(init_seed)
                model = Sam3Segmenter(variant.make_config(image_size))
                _init_random(model)
            model.text_tokenizer = ByteTokenizer()
            return _ready(model)
        source = checkpoint if checkpoint is not None else variant.hub_id
        if source is None:
            raise SamtuneError(f"model.name={variant.name!r} has no download: set model.checkpoint to a Hugging Face folder of SAM 3.")
        path = Path(source)
        if path.suffix in {".pt", ".pth"}:
            return _ready(load_official(path, variant, image_size))
        if path.is_file() and path.suffix != ".safetensors":
            raise SamtuneError(f"model.checkpoint={source!r} is not a Hugging Face folder of SAM 3 (config.json + model.safetensors) "
                               "nor Meta's sam3.pt.")  # fmt: skip
        return _ready(load_released(source, variant.name, image_size))

    def load_full(self, folder) -> Sam3Segmenter:
        model = Sam3Segmenter.from_pretrained(str(folder))
        model.text_tokenizer = None  # whole-model folders hold no tokenizer; init does not matter when loading
        return _ready(model.eval())

    def encoder_depth(self, model) -> int:
        return _config(model).detector_config.vision_config.backbone_config.num_hidden_layers

    # --- data in and out ---
    def make_transform(self, image_size: int) -> SquareResizeTransform:
        return SquareResizeTransform(image_size, SAM3_MEAN, SAM3_STD)

    def encode_images(self, model, pixel_values: torch.Tensor) -> ImageEmbeddings:
        detector, _, tracker = model.vision_encoder(pixel_values)
        decoder = model.mask_decoder
        image = tracker[2] + model.no_memory_embedding.reshape(1, -1, 1, 1)
        return ImageEmbeddings(image, (decoder.conv_s0(tracker[0]), decoder.conv_s1(tracker[1]), *detector))

    def decode_prompts(self, model, embeddings, boxes=None, points=None, point_labels=None, mask_inputs=None, multimask_output=False,
                       class_tokens=None):  # fmt: skip
        image = embeddings.image_embeddings
        n = len(image)
        has_points = points is not None and points.shape[1] > 0
        if class_tokens is not None:
            tokens = class_tokens if class_tokens.dim() == 3 else class_tokens[None].expand(n, -1, -1)
            if not has_points and boxes is None and mask_inputs is None:  # the automatic result for that class
                logits, presence = _detect(model, embeddings, tokens.to(image.dtype))
                return logits[:, None], torch.sigmoid(presence)
            projected = model.detector.class_projection(tokens.to(image.dtype))
            return decode_with_class_tokens(_decode, model, embeddings, projected, boxes, points, point_labels, mask_inputs, multimask_output)
        if not has_points and boxes is None:  # Sam3TrackerModel's empty prompt: one padding point
            points, point_labels, has_points = image.new_zeros(n, 1, 2), torch.full((n, 1), -1, device=image.device), True
        sparse, dense = model.prompt_encoder(
            input_points=points[:, None] if has_points else None, input_labels=point_labels[:, None] if has_points else None,
            input_boxes=boxes[:, None] if boxes is not None else None, input_masks=mask_inputs,
        )  # fmt: skip
        low_res, iou = _decode(model, embeddings, sparse, dense, multimask_output)
        return low_res[:, 0], iou[:, 0]

    def decode_classes(self, model, embeddings, class_tokens):
        batch, (k, t, c) = len(embeddings.image_embeddings), class_tokens.shape
        rows = embeddings.repeat_interleave(k)  # image b, class j at row b·K + j
        prompt = class_tokens.to(rows.image_embeddings.dtype)[None].expand(batch, -1, -1, -1).reshape(batch * k, t, c)
        logits, _ = _detect(model, rows, prompt)
        return logits.view(batch, k, *logits.shape[-2:])

    def prompt_dim(self, model) -> int:
        return _config(model).detector_config.detr_encoder_config.hidden_size

    def text_embeddings(self, model, names: list[str], n_tokens: int) -> torch.Tensor:
        tokenizer = getattr(model, "text_tokenizer", None)
        if tokenizer is None:
            raise SamtuneError("automatic.init=text: this SAM 3 model was loaded without a tokenizer; build it from model.name / model.checkpoint.")
        # label names such as nnU-Net's "kidney_left" are read as words ("kidney left")
        features = name_features(model.text_encoder, model.detector.text_projection, tokenizer, [n.replace("_", " ") for n in names])
        return torch.stack([last_tokens(f, n_tokens) for f in features]).float()

    def export(self, model, fmt: str, out) -> list:
        from samtune.adapters.export import export_hf, merge_model

        if fmt not in self.export_formats:
            raise SamtuneError(f"--format {fmt!r}: a SAM 3 model exports hf (samtune's Sam3Segmenter folder, LoRA merged); "
                               "sam-pth and onnx are SAM v1's formats.")  # fmt: skip
        return export_hf(merge_model(model), Path(out))

    # --- volumes ---
    def video_model(self, model, variant: ModelVariant, checkpoint: str | None):
        """``Sam3TrackerVideoModel`` around the model's own modules (adapters/sam3_video.py), its memory
        modules from the SAM 3 folder, hub id or ``sam3.pt`` the model was built from
        (``tracker_model.memory_*`` ... beside the image weights), or at random init for random variants."""
        source = checkpoint if checkpoint is not None else variant.hub_id
        if source is None:
            return video_model_from(model)
        way_out = "or use eval.propagation=box (slice by slice from the previous slice's box)"
        if Path(source).suffix in {".pt", ".pth"}:  # Meta's file: converted again, its tracker's keys kept this time
            folder, released = Path(source), official_to_released(load_state_dict_file(source)).items()
        else:
            try:
                folder, files = weight_files(source, variant.name)
            except SamtuneError as exc:
                raise SamtuneError(f"{exc}\nMemory propagation reads SAM 3's memory modules from there too: set model.checkpoint to a folder of "
                                   f"facebook/sam3, {way_out}.") from None  # fmt: skip
            released = released_tensors(files, RELEASED_PREFIX)
        memory = memory_of_released(released)
        if not memory:
            raise SamtuneError(f"{folder}: holds no memory modules of SAM 3's tracker (no {RELEASED_PREFIX}memory_* weights): it was "
                               f"saved from an image model. Set model.checkpoint to a folder of facebook/sam3 (saved from Sam3VideoModel), "
                               f"{way_out}.")  # fmt: skip
        return video_model_from(model, memory)

    # --- what trains ---
    def trainable_modules(self, mode: str, model=None) -> tuple[str, ...]:
        modules = super().trainable_modules(mode, model)
        if mode != "full" and model is not None and hasattr(model, CLASS_PROMPTS):
            return (self.mask_decoder, self.detector, *modules[1:])
        return modules

    def component_of(self, parameter_name: str) -> str:
        if parameter_name.endswith("no_memory_embedding") or ".text_encoder." in f".{parameter_name}":
            return "image_encoder"  # frozen encoders
        if f"{self.detector}." in parameter_name and "lora_" not in parameter_name:
            return "mask_decoder"  # the detector's heads train as the decoder does
        return super().component_of(parameter_name)


# --- decoding ------------------------------------------------------------------------------------


def _decode(model, embeddings: ImageEmbeddings, sparse, dense, multimask_output: bool):
    """The tracker's mask decoder: N×P×T×C sparse, N×C×g×g dense -> N×P×M×s×s, N×P×M."""
    image = embeddings.image_embeddings
    positions = model.get_image_wide_positional_embeddings().repeat(len(image), 1, 1, 1)
    return model.mask_decoder(
        image_embeddings=image, image_positional_embeddings=positions, sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=multimask_output, high_resolution_features=list(embeddings.high_res_features[:2]),
    )[:2]  # fmt: skip


def _detect(model, embeddings: ImageEmbeddings, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One concept prompt per row (N×T×C) -> N×4g×4g class logits and N×1 presence logits."""
    features = list(embeddings.high_res_features[2:5])
    neck = model.vision_encoder.neck
    positions = [neck.position_encoding(f.shape, f.device, f.dtype) for f in features]
    scores, presence, masks = model.detector(features, positions, prompt)
    return concept_logits(scores, presence, masks), presence


def concept_logits(scores: torch.Tensor, presence: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """B×Q query scores, B×1 presence, B×Q×h×w mask logits -> B×h×w logits of
    p = sigmoid(presence) · max_q sigmoid(score_q) · sigmoid(mask_q), in log space (module docstring)."""
    log_p = F.logsigmoid(presence.float())[:, :, None] + (F.logsigmoid(scores.float())[:, :, None, None] + F.logsigmoid(masks.float())).amax(1)
    log_p = log_p.clamp(math.log(PROBABILITY_FLOOR), math.log1p(-PROBABILITY_FLOOR))
    return (log_p - torch.log(-torch.expm1(log_p))).to(masks.dtype)


# --- building ------------------------------------------------------------------------------------


def _config(model):
    config = getattr(model, "config", None)  # a PeftModel forwards .config to the base model
    if config is None or not hasattr(config, "detector_config"):
        raise TypeError(f"expected samtune's Sam3Segmenter (or a peft model around one), got {type(model).__name__}")
    return config


def _ready(model: Sam3Segmenter) -> Sam3Segmenter:
    """Decode the single-mask token whenever one mask is asked for (adapters/sam2.py explains why)."""
    model.mask_decoder.dynamic_multimask_via_stability = False
    return model.eval()


@torch.no_grad()
def _init_random(model: Sam3Segmenter) -> None:
    """Initialisation a random SAM 3 can learn from: convolutions at PyTorch's fan-in scale
    (transformers draws them at std 0.02, which through the necks' three convolutions leaves the
    tracker's finest map at ~1e-5 of unit scale and the decoder's logits at ~1e-4), and one Fourier
    matrix for image and prompts (``same_positional_tables``)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
    same_positional_tables(model)


@torch.no_grad()
def same_positional_tables(model: Sam3Segmenter) -> None:
    """One Fourier matrix for image positions and prompt coordinates (random init draws two; the
    release has one, as SAM 2: adapters/sam2_config.py)."""
    model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)


_SAM3_LICENCE = "SAM License (facebook/sam3 model card; not an OSI licence: read it before redistributing)"
register_model(ModelVariant("sam3", "sam3", "SAM 3 (Meta, 2025): detector + tracker on one 1008 px ViT; text concepts", 1008, "facebook/sam3", None,
                            licence=_SAM3_LICENCE))  # fmt: skip
register_model(ModelVariant("sam3-tiny-random", "sam3", "random-init small SAM 3 (ViT, detector, tracker) for tests and offline runs", 112, None, None,
                            make_tiny_sam3_config, licence="none: random initialisation"))  # fmt: skip

