"""``python -m samtune.finetune`` runs the ``samtune`` command line."""

from samtune.finetune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
