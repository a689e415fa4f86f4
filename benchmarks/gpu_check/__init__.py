"""The one-command GPU check: ``python -m benchmarks.gpu_check --out DIR`` (see ``__main__``)."""
