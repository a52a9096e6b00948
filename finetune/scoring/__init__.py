"""The scoring station: the evaluation protocol (``protocol``: what is prompted, how, at which
resolution), the metric accumulators (``metrics``, ``semantic_metrics``, ``volume_metrics``) and
the printed tables and per-case files (``tables``). Used by training, ``samtune evaluate`` and the report."""
