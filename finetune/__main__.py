"""``python -m samtune.finetune`` runs the ``samtune`` command line."""

from samtune.finetune.cli import main

raise SystemExit(main())
