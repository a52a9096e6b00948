"""``samtune predict --engine onnxruntime``: the automatic mode's two model calls (image encoder,
class-prompt decoder) run by ONNX Runtime instead of PyTorch.

Why: on the CPU, ONNX Runtime fuses the encoder's small operations (layer norms, GELUs, window
partitions of TinyViT) that PyTorch's eager mode runs one by one; MobileSAM's encoder at 512 px
took 0.21-0.24 s per image against PyTorch's 0.47 s (2 threads, batch 8, same machine; logits
within 1e-5; figures and command in docs/howto/predict.md). Writing our own fused kernels would
be the alternative; ONNX Runtime is a well-kept library that does exactly this.

How: the inference model (LoRA merged, ``runtime.inference_model``) is traced once per checkpoint
and image size through the family's own ``encode_images`` and ``decode_classes`` (so every family
gets the same path, whatever its encoder returns) with PyTorch's TorchScript-based exporter (the
dynamo exporter would need onnxscript), and the two graphs are cached by a hash of the weights
(``~/.cache/samtune/onnx`` by default, written atomically): the next prediction with the same
checkpoint starts in a fraction of a second. ``OnnxFamily`` then stands in for the family: it
answers ``encode_images`` and ``decode_classes`` from the two sessions and passes everything else
(geometry, prompted decoding, propagation) to the real family, which keeps running in PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from samtune import SamtuneError
from samtune.adapters.family import CLASS_PROMPTS, ImageEmbeddings, ModelFamily

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime")  # samtune predict --engine
OPSET = 17


def default_cache() -> Path:
    """Where exported graphs are kept: ``$SAMTUNE_CACHE/onnx``, else ``$XDG_CACHE_HOME/samtune/onnx``, else ``~/.cache/samtune/onnx``."""
    root = os.environ.get("SAMTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "samtune"
    return Path(root) / "onnx"


class _Encoder(torch.nn.Module):
    """B×3×S×S pixels -> (image_embeddings, *high_res_features): the family's ``encode_images`` as one graph."""

    def __init__(self, model, family: ModelFamily):
        super().__init__()
        self.model, self.family = model, family

    def forward(self, pixel_values):
        embeddings = self.family.encode_images(self.model, pixel_values)
        return (embeddings.image_embeddings, *embeddings.high_res_features)


class _ClassDecoder(torch.nn.Module):
    """(image_embeddings, *high_res_features) -> B×K×s×s logits: every class prompt (baked in as constants) on every image."""

    def __init__(self, model, family: ModelFamily):
        super().__init__()
        self.model, self.family = model, family

    def forward(self, image_embeddings, *high_res):
        tokens = getattr(self.model, CLASS_PROMPTS)()
        return self.family.decode_classes(self.model, ImageEmbeddings(image_embeddings, tuple(high_res)), tokens)


def weights_key(model, image_size: int) -> str:
    """A hash of everything the graphs depend on: every parameter and buffer (names, shapes, bytes),
    the image size and the torch version that traced them."""
    digest = hashlib.sha256(f"{image_size}|{torch.__version__}|opset{OPSET}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def _expm1(g, x):
    """``aten::expm1`` for the TorchScript exporter, which has none at opset 17: exp(x) - 1 (SAM 3's
    class logits use it; float32 rounding near x = 0 is the only difference)."""
    return g.op("Sub", g.op("Exp", x), g.op("Constant", value_t=torch.tensor(1.0)))


def _export(module: torch.nn.Module, inputs: tuple, names: list[str], outputs: list[str], path: Path) -> None:
    """Trace ``module`` into ``path`` (atomically: a temporary file renamed), batch axis dynamic."""
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1, OPSET)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns at every shape read in Python; the batch axis is checked free by the tests
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module, inputs, tmp, input_names=names, output_names=outputs, dynamic_axes={n: {0: "batch"} for n in names + outputs},
                dynamo=False, opset_version=OPSET,
            )  # fmt: skip
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_graphs(model, family: ModelFamily, image_size: int, cache: Path) -> tuple[Path, Path | None]:
    """The encoder and class-decoder graphs of ``model`` (an inference model) in ``cache``, traced if not
    there yet; no class decoder for a model without class prompts (``task: promptable``)."""
    key = weights_key(model, image_size)
    encoder_path = cache / f"{key}.encoder.onnx"
    decoder_path = cache / f"{key}.classes.onnx" if hasattr(model, CLASS_PROMPTS) else None
    if encoder_path.exists() and (decoder_path is None or decoder_path.exists()):
        log.info("onnxruntime: graphs from the cache (%s)", cache)
        return encoder_path, decoder_path
    log.info("onnxruntime: tracing this checkpoint's image encoder%s once, into %s", " and class decoder" if decoder_path else "", cache)
    pixels = torch.zeros(2, 3, image_size, image_size)
    encoder = _Encoder(model, family).eval()
    with torch.no_grad():
        features = encoder(pixels)
    feature_names = ["image_embeddings", *(f"high_res_{i}" for i in range(len(features) - 1))]
    try:
        _export(encoder, (pixels,), ["pixel_values"], feature_names, encoder_path)
        if decoder_path is not None:
            _export(_ClassDecoder(model, family).eval(), tuple(features), feature_names, ["class_logits"], decoder_path)
        _check_graphs(model, family, encoder_path, decoder_path, image_size)
    except Exception as error:  # the tracer's errors name torch internals; say what to do instead
        for path in (encoder_path, decoder_path):
            if path is not None and path.exists():
                path.unlink()
        raise SamtuneError(f"--engine onnxruntime: the {family.name} model could not be exported to ONNX ({type(error).__name__}: "
                           f"{str(error)[:300]}); use --engine torch.") from error  # fmt: skip
    return encoder_path, decoder_path


def _check_graphs(model, family: ModelFamily, encoder_path: Path, decoder_path: Path | None, image_size: int) -> None:
    """Run the new graphs on 3 images (traced with 2) against the family's PyTorch code: a tracer can
    bake a shape into a graph (a reshape by the traced batch) and such a graph must not be cached."""
    pixels = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    fast = OnnxFamily(family, encoder_path, decoder_path, torch.get_num_threads())
    with torch.no_grad():
        reference = family.encode_images(model, pixels)
        got = fast.encode_images(model, pixels)
        pairs = list(zip((got.image_embeddings, *got.high_res_features), (reference.image_embeddings, *reference.high_res_features)))
        if decoder_path is not None:
            tokens = getattr(model, CLASS_PROMPTS)()
            pairs.append((fast.decode_classes(model, got, tokens), family.decode_classes(model, reference, tokens)))
    for a, b in pairs:
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3):
            raise ValueError(f"ONNX Runtime's output {tuple(a.shape)} differs from PyTorch's {tuple(b.shape)} "
                             f"(max difference {(a.float() - b.float()).abs().max() if a.shape == b.shape else 'shape'})")  # fmt: skip


class OnnxFamily:
    """A model family whose ``encode_images`` and ``decode_classes`` run two ONNX Runtime sessions of
    one exported model (the ``model`` and ``class_tokens`` arguments are those the graphs were traced
    with, so they are not read); every other attribute is the wrapped family's."""

    def __init__(self, family: ModelFamily, encoder_path: Path, decoder_path: Path | None, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self._family = family
        self._encoder = ort.InferenceSession(str(encoder_path), options, providers=providers)
        self._decoder = None if decoder_path is None else ort.InferenceSession(str(decoder_path), options, providers=providers)
        self._feature_names = [o.name for o in self._encoder.get_outputs()]

    def __getattr__(self, name):
        return getattr(self._family, name)

    def encode_images(self, model, pixel_values: torch.Tensor) -> ImageEmbeddings:
        outputs = self._encoder.run(None, {"pixel_values": pixel_values.float().contiguous().numpy()})
        tensors = [torch.from_numpy(o) for o in outputs]
        return ImageEmbeddings(tensors[0], tuple(tensors[1:]))

    def decode_classes(self, model, embeddings: ImageEmbeddings, class_tokens: torch.Tensor) -> torch.Tensor:
        if self._decoder is None:  # no class prompts were exported: the family's own (which says so)
            return self._family.decode_classes(model, embeddings, class_tokens)
        features = (embeddings.image_embeddings, *embeddings.high_res_features)
        wanted = {i.name for i in self._decoder.get_inputs()}  # the tracer leaves out inputs a graph never reads (SAM 3: the tracker's map)
        feeds = {name: f.float().contiguous().numpy() for name, f in zip(self._feature_names, features) if name in wanted}
        return torch.from_numpy(self._decoder.run(None, feeds)[0])


def onnx_family(model, family: ModelFamily, image_size: int, device: torch.device, precision: str, cache: Path | None = None) -> OnnxFamily:
    """``family`` with its automatic-mode calls on ONNX Runtime (CPU, float32), for ``model``."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise SamtuneError("--engine onnxruntime needs the onnx extra: pip install 'samtune[onnx]'.") from None
    if device.type != "cpu":
        raise SamtuneError(f"--engine onnxruntime runs on the CPU; this prediction runs on {device}: use --engine torch (or --device cpu).")
    if precision != "fp32":
        raise SamtuneError(f"--engine onnxruntime computes in float32; --precision {precision} is PyTorch's: use --precision fp32 (or auto) with it.")
    encoder_path, decoder_path = export_graphs(model, family, image_size, cache or default_cache())
    return OnnxFamily(family, encoder_path, decoder_path, torch.get_num_threads())
