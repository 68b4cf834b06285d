"""Accuracy experiments behind the results tables (README.md, docs/results.md) (speed lives in ``benchmarks/``)."""
