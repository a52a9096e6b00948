"""What each ``samtune`` command runs, given its parsed arguments (the parsers are in
``samtune.finetune.cli``): one ``_cmd_<command>`` per command, in ``COMMANDS``. Heavy modules are
imported inside each handler, so a command loads only what it uses (``validate`` and
``recipe-keys`` load no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from samtune import SamtuneError
from samtune.finetune.recipe import Recipe


def _load(args: argparse.Namespace) -> Recipe:
    from samtune.finetune.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    recipe = _load(args)
    from samtune.finetune import api

    if args.resume_force and args.resume is None:
        raise SamtuneError("--resume-force is only meaningful with --resume.")
    api.train(recipe, resume=args.resume, resume_force=args.resume_force)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    recipe = _load(args)
    from samtune.finetune import api

    api.evaluate(recipe, args.checkpoint, args.out)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from samtune.finetune import api
    from samtune.finetune.predict.prediction import predict
    from samtune.finetune.recipe import load_recipe

    for flag, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise SamtuneError(f"{flag} {value}: give a whole number of at least 1.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    folder = api.checkpoint_folder(args.checkpoint)
    recipe = load_recipe(args.recipe or folder / "recipe.yaml", args.overrides)
    loaded = api.load_model(folder, recipe, device=args.device)
    predict(loaded, args.input, args.out, args.prompts, series=args.series, output_format=args.output_format, resample=args.resample,
            seg_type=args.seg_type, precision=args.precision, batch_size=args.batch_size, engine=args.engine)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from samtune.finetune.serve.server import ServeSettings, run_server

    run_server(ServeSettings(args.checkpoint, args.studies, args.host, args.port, args.token, args.device, args.max_upload_mb,
                             session_expiry_s=args.session_expiry))  # fmt: skip
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from samtune.finetune.recipe import dump_recipe

    recipe = _load(args)
    print(dump_recipe(recipe), end="")
    root = Path(recipe.data.root)
    if not root.exists() and not recipe.data.generate_demo:
        raise SamtuneError(f"{args.recipe}: data.root={recipe.data.root!r} does not exist (resolved to {root.resolve()}).")
    print(f"# {args.recipe}: valid")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from samtune.datasets.synthetic import generate_demo_data

    kinds = ("ct", "cityscapes") if args.kind == "all" else (args.kind,)
    made = generate_demo_data(args.out, seed=args.seed, kinds=[k for k in kinds if k in ("ct", "cityscapes")])
    if {"bdd100k", "acdc", "mapillary"} & set(kinds):  # small trees in the published BDD100K / ACDC / Vistas layouts
        from samtune.datasets.driving_demo import generate_acdc, generate_bdd100k, generate_mapillary

        generate = {"bdd100k": generate_bdd100k, "acdc": generate_acdc, "mapillary": generate_mapillary}
        made.update({kind: generate[kind](args.out / kind, seed=args.seed) for kind in kinds if kind in generate})
    if "coco" in kinds:  # a small COCO tree: polygons, RLE and a crowd region (needs pycocotools)
        from samtune.datasets.coco_demo import generate_coco

        made["coco"] = generate_coco(args.out / "coco", seed=args.seed)
    if "dicom" in kinds:  # the CT phantom's patients as a DICOM export (~6 s: not part of "all")
        from samtune.datasets.dicom_demo import generate_dicom_phantom

        made["dicom"] = generate_dicom_phantom(args.out, seed=args.seed)
    for kind, path in made.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from samtune.finetune import api
    from samtune.finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe or args.checkpoint / "recipe.yaml")
    for path in api.export_checkpoint(recipe, args.checkpoint, args.format, args.out):
        print(path)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    recipe = _load(args)
    from samtune.finetune.inspection import run_inspect

    return run_inspect(recipe, args.out)


def _cmd_cache(args: argparse.Namespace) -> int:
    recipe = _load(args)
    from samtune.finetune.train.embedding_cache import run_cache

    done = run_cache(recipe, prune_stale=args.prune, progress=not args.quiet)
    if args.prune:
        for path in done["removed"]:
            print(f"removed {path}")
        print(f"{len(done['removed'])} stale caches removed; kept {', '.join(done['kept']) or 'none'}")
    for c in done.get("caches", []):
        print(f"{c['folder']}: {c['entries']} of {c['images']} images cached, {c['mb']:.1f} MB")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:  # torch is imported only when a montage is predicted
    from samtune.finetune.report.page import write_report

    print(write_report(args.runs, args.out, cases=args.cases, max_samples=args.max_samples, device=args.device))
    return 0


def _cmd_fastsam(args: argparse.Namespace) -> int:
    recipe = _load(args)
    from samtune.finetune.fastsam import run

    out = args.out or Path(recipe.output.dir) / "fastsam"
    run(recipe, args.weights, out, epochs=args.epochs, image_size=args.image_size or recipe.model.image_size, batch=args.batch,
        device=args.device, conf=args.conf, export_only=args.export_only, progress=not args.quiet)  # fmt: skip
    if args.export_only:
        print(out / "yolo_data" / "data.yaml")
    return 0


def _cmd_recipe_keys(args: argparse.Namespace) -> int:
    from samtune.finetune.recipe import recipe_table

    print(recipe_table())
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "validate": _cmd_validate,
    "demo-data": _cmd_demo_data,
    "export": _cmd_export,
    "inspect": _cmd_inspect,
    "cache": _cmd_cache,
    "report": _cmd_report,
    "serve": _cmd_serve,
    "fastsam": _cmd_fastsam,
    "recipe-keys": _cmd_recipe_keys,
}
