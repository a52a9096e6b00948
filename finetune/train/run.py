"""What a training run builds once (torchtune's recipe "setup" phase): ``build_run(recipe)`` gives
a ``Run`` with the model, its family, the data, the optimisation (optimiser, scheduler, losses,
the step's loss module), the loop's random generators, the log and the files it writes. The
training batches open later (``Run.open_batches``): where they start depends on the state the
loop starts from (``samtune.finetune.train.loop.start_state``)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from samtune import SamtuneError
from samtune.adapters.family import ModelFamily, check_text_init
from samtune.adapters.lora import count_parameters, prepare_trainable
from samtune.datasets import sample as S
from samtune.datasets import semantic as SEM
from samtune.datasets.semantic import collate_semantic
from samtune.files import write_atomic
from samtune.finetune.checkpoints import save_checkpoint
from samtune.finetune.data import DataBundle, build_datasets
from samtune.finetune.recipe import Recipe, dump_recipe
from samtune.finetune.runtime import (build_base_model, check_precision, check_writable, compile_encoder, image_size_of, model_family,
                                      resolve_device, seed_everything)
from samtune.finetune.distributed import Ranks, main_first
from samtune.finetune.train.log import SilentLog, TrainLog
from samtune.finetune.train.losses import AutomaticLoss, make_mask_loss
from samtune.finetune.train.resume import DataOrder, check_same_recipe, find_state, save_state
from samtune.finetune.train.state import LoopRandom, LoopState
from samtune.finetune.train.step import MicroBatch, Optimization, build_optimization, cached_embeddings

log = logging.getLogger(__name__)


@dataclass
class RunFiles:
    """The files of a run (``output.dir``): the resolved recipe, ``checkpoints/{last,best}``, the
    training states. Only rank 0 writes (``write=False`` elsewhere)."""

    out: Path
    recipe_yaml: str
    classes: dict  # classes.json of every checkpoint: task, tokens, label space
    write: bool = True

    def checkpoint(self, name: str) -> Path:
        return self.out / "checkpoints" / name

    def save_recipe(self) -> None:
        if self.write:
            write_atomic(self.out / "recipe.yaml", self.recipe_yaml)

    def save_checkpoint(self, name: str, model, info: dict, card: str | None = None) -> None:
        if self.write:
            save_checkpoint(model, self.checkpoint(name), self.recipe_yaml, info, self.classes, card)

    def save_state(self, step: int, model, opt: Optimization, loop: dict, rank_states: list, keep: int) -> None:
        if self.write:
            save_state(self.out, step, model, opt.optimizer, opt.scheduler, loop, rank_states, self.recipe_yaml, keep)


@dataclass
class TrainBatches:
    """The training batches of both paths, drawn with replacement in a seeded order that a resumed
    run continues (``DataOrder``), moved to the device, with cached embeddings where there are."""

    data: DataBundle
    device: torch.device
    prompted: object | None  # iterator of prompted batches, None without the prompted path
    automatic: object | None  # iterator of semantic batches, None without the automatic path
    caches: dict = field(default_factory=dict)  # train.embedding_cache: id(source) -> EmbeddingCache

    def next(self, path: str, state: LoopState) -> MicroBatch:
        auto = path == "automatic"
        raw = next(self.automatic if auto else self.prompted)
        batch = {k: (v.to(self.device) if k != S.META else v) for k, v in raw.items()}
        state.served[path] += 1
        masks = batch[SEM.LABELS].shape[0] * len(self.data.space.ids) if auto else batch[S.MASKS].shape[0] * batch[S.MASKS].shape[1]
        embeddings = cached_embeddings(self.caches, self.data.train_semantic if auto else self.data.train, batch, self.device)
        return MicroBatch(batch, embeddings, masks)


@dataclass
class Run:
    recipe: Recipe
    ranks: Ranks
    device: torch.device
    family: ModelFamily
    data: DataBundle
    model: torch.nn.Module
    params: dict  # count_parameters: trainable / total / per kind
    opt: Optimization
    random: LoopRandom
    log: TrainLog | SilentLog
    files: RunFiles
    state_dir: Path | None = None  # the training state to resume, None for a new run
    batches: TrainBatches | None = None  # opened by open_batches

    @property
    def out(self) -> Path:
        return self.files.out

    def open_batches(self, served: dict) -> None:
        """The training loaders, past the batches already ``served`` (a resumed run); with
        ``train.embedding_cache`` the caches are filled first (rank 0 first, the others then read)."""
        recipe, data, caches = self.recipe, self.data, {}
        if recipe.train.embedding_cache:  # decoder_only: the frozen encoder's output of each training image, once
            from samtune.finetune.train.embedding_cache import build_caches

            with main_first():
                caches = build_caches(recipe, self.family, self.model, data, self.device, progress=sys.stderr.isatty() and self.ranks.main)
        prompted = automatic = None
        if data.train is not None:
            prompted = _loader(data.train, recipe, S.collate_samples, recipe.seed, served["prompted"], self.ranks)
        if data.train_semantic is not None:
            automatic = _loader(data.train_semantic, recipe, collate_semantic, recipe.seed + 2, served["automatic"], self.ranks)
        self.batches = TrainBatches(data, self.device, prompted, automatic, caches)


def build_run(recipe: Recipe, ranks: Ranks = Ranks(), rank_device: torch.device | None = None,  # noqa: B008  (frozen dataclass)
              resume: str | Path | None = None, resume_force: bool = False) -> Run:  # fmt: skip
    """Everything a run builds once. ``resume``: "latest" or a state or run folder, checked against
    the recipe before anything is built (``samtune.finetune.train.resume``)."""
    out = check_writable(recipe.output.dir)
    recipe_yaml = dump_recipe(recipe)
    state_dir = None
    if resume is not None:
        state_dir = find_state(out, resume)
        check_same_recipe((state_dir / "recipe.yaml").read_text(), recipe_yaml, state_dir, resume_force)
        log.info("resuming from %s", state_dir)
    files = RunFiles(out, recipe_yaml, {}, write=ranks.main)
    files.save_recipe()
    seed_everything(recipe.seed)
    device = rank_device or resolve_device(recipe.train.device)
    family = model_family(recipe)
    if recipe.task != "promptable" and recipe.automatic.init == "text":
        check_text_init(family)  # before any data or model is built
    check_precision(recipe.train.precision, device)  # warns about bf16 on a CPU that emulates it
    with main_first():  # rank 0 writes demo data and slice caches, the others then read them
        data = build_datasets(recipe, family.make_transform(image_size_of(recipe)), progress=ranks.main)
    _log_data(data)
    model, params = build_trainable_model(recipe, family, data, device)
    tokens = recipe.automatic.tokens if recipe.task != "promptable" else 0
    files.classes = {"task": recipe.task, "tokens": tokens, "label_space": data.space.to_dict(), **_class_codes(recipe, data)}
    if ranks.world > 1:  # same weights everywhere (built above from one seed); per-sample randomness per rank
        seed_everything(recipe.seed + 1_000 * ranks.rank)
    opt = build_optimization(model, family, recipe, _loss_fns(recipe, data, device), ranks)
    train_log = TrainLog(out, recipe, device) if ranks.main else SilentLog()
    return Run(recipe, ranks, device, family, data, model, params, opt, LoopRandom(recipe.seed, ranks.rank, device), train_log, files, state_dir)


def build_trainable_model(recipe: Recipe, family: ModelFamily, data: DataBundle, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The base model with class prompts (automatic path), gradient checkpointing, LoRA or the
    recipe's other train.mode, on ``device``, compiled if asked; and its parameter counts."""
    base = build_base_model(recipe)
    if recipe.task != "promptable":
        family.add_class_prompts(base, len(data.space.ids), recipe.automatic.tokens, seed=recipe.seed, class_names=data.space.names,
                                 init=recipe.automatic.init)  # fmt: skip
    if recipe.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_trainable(base, family, recipe.train.mode, recipe.adapter.lora).to(device)
    if recipe.train.compile:
        compile_encoder(model, family)
    params = count_parameters(model, family)
    log.info(
        "parameters (%s): %s trainable of %s total — %s",
        recipe.train.mode, f"{params['trainable']:,}", f"{params['total']:,}",
        ", ".join(f"{k} {v:,}" for k, v in params.items() if v and k not in ("trainable", "total")),
    )
    return model, params


def _class_codes(recipe: Recipe, data: DataBundle) -> dict:
    """``{"codes": {name: code}}`` for the volume formats (codes for DICOM-SEG and viewers: the
    recipe's ``data.class_codes``, else the codes the data carries (DICOM-SEG segments), else
    samtune's organ table, else null = unknown, with a warning); nothing for the others."""
    if "class_codes" not in type(recipe.data).model_fields:
        return {}
    from samtune.datasets.label_codes import UNKNOWN, code_to_dict, resolve_codes

    found = {n: c for n, c in (getattr(data.split, "codes", None) or {}).items() if c is not UNKNOWN and n in data.space.names}
    codes = resolve_codes(data.space.names, {**found, **(recipe.data.class_codes or {})})
    return {"codes": {name: code_to_dict(code) for name, code in codes.items()}}


def _log_data(data: DataBundle) -> None:
    if data.train is not None:
        log.info("prompted: training on %d images/slices with objects; validating on %d prompted objects", len(data.train), len(data.val))
    if data.train_semantic is not None:
        log.info("automatic: %d classes (%s); training on %d images/slices, validating on %d", len(data.space.ids),
                 ", ".join(data.space.names), len(data.train_semantic), len(data.val_semantic))  # fmt: skip


def _loss_fns(recipe: Recipe, data: DataBundle, device: torch.device) -> dict:
    """The loss of each path: Dice + focal (+ BCE) on prompted masks; the same per class map,
    weighted by ``automatic.class_weights``, on the automatic path."""
    w = recipe.loss
    fns = {"prompted": make_mask_loss(w.dice_weight, w.focal_weight, w.bce_weight)}
    if data.train_semantic is not None:
        fns["automatic"] = AutomaticLoss(w.dice_weight, w.focal_weight, _class_weights(recipe, data.space), bce_weight=w.bce_weight).to(device)
    return fns


def _class_weights(recipe: Recipe, space) -> torch.Tensor | None:
    weights = recipe.automatic.class_weights
    if not weights:
        return None
    unknown = [n for n in weights if n not in space.names]
    if unknown:
        raise SamtuneError(f"automatic.class_weights: {unknown} are not classes of this dataset ({', '.join(space.names)}).")
    return torch.tensor([float(weights.get(n, 1.0)) for n in space.names])


def _loader(dataset, recipe: Recipe, collate, seed: int, served: int = 0, ranks: Ranks = Ranks()):  # noqa: B008  (frozen dataclass)
    """Batches of ``dataset`` drawn with replacement, enough for every step, in a seeded order
    (``DataOrder``: RandomSampler's draws; this rank's share of them); ``served``: batches this
    rank already used (a resumed run)."""
    batch = recipe.train.batch_size
    total = recipe.train.steps * recipe.train.accumulate * batch * ranks.world
    order = DataOrder(len(dataset), total, seed, served * batch * ranks.world, batch, ranks.rank, ranks.world)
    return iter(DataLoader(dataset, batch_size=recipe.train.batch_size, sampler=order, collate_fn=collate,
                           num_workers=recipe.train.num_workers, drop_last=True))  # fmt: skip
