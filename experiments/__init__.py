"""Accuracy experiments behind the README tables (speed lives in ``benchmarks/``)."""
