"""samtune.datasets"""

if __name__ == "datasets":  # imported as a bare top-level name (repo root on sys.path)
    raise ImportError(
        "This folder is the package samtune.datasets, not a top-level 'datasets' package. "
        "Install the project (pip install -e .) and import samtune.datasets; run pytest with "
        "--import-mode=importlib (the default in pyproject.toml)."
    )
