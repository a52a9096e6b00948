"""samtune.adapters: model families (SAM v1 through transformers), variants, LoRA (peft), export.

``build_sam`` / ``build_model`` (a registered variant by name), ``family_of`` (the interface the
trainer uses) and ``list_models`` are importable from here.
"""

if __name__ == "adapters":  # imported as a bare top-level name (repo root on sys.path)
    raise ImportError(
        "This folder is the package samtune.adapters, not a top-level 'adapters' package. "
        "Install the project (pip install -e .) and import samtune.adapters; run pytest with "
        "--import-mode=importlib (the default in pyproject.toml)."
    )

from samtune.adapters.registry import build_model, build_sam, family_of, get_variant, list_models  # noqa: E402

__all__ = ["build_model", "build_sam", "family_of", "get_variant", "list_models"]
