"""The training station: what a run builds once (``run.build_run``), the loop (``loop``: start,
fit, evaluate and save, finish), the optimiser step (``step``), the state carried between steps
(``state``) and its files (``resume``), the logs (``log``), losses, optimiser and scheduler, and
the embedding cache. The processes of a torchrun launch are ``samtune.finetune.distributed``
(shared with scoring). Nothing here is imported by the package itself: import the modules."""
