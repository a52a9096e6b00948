"""samtune.finetune"""

if __name__ == "finetune":  # imported as a bare top-level name (repo root on sys.path)
    raise ImportError(
        "This folder is the package samtune.finetune, not a top-level 'finetune' package. "
        "Install the project (pip install -e .) and import samtune.finetune; run pytest with "
        "--import-mode=importlib (the default in pyproject.toml)."
    )
