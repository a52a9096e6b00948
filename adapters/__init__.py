"""samtune.adapters"""

if __name__ == "adapters":  # imported as a bare top-level name (repo root on sys.path)
    raise ImportError(
        "This folder is the package samtune.adapters, not a top-level 'adapters' package. "
        "Install the project (pip install -e .) and import samtune.adapters; run pytest with "
        "--import-mode=importlib (the default in pyproject.toml)."
    )
