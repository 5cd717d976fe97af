"""Benchmarks (`python -m bench.<name>`); each module's docstring says what it measures."""

import replicas  # noqa: F401  (sets OpenMP's wait policy before any benchmark imports torch: see its __init__)
