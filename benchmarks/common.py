"""Shared helpers of the benchmarks: they live in :mod:`sean_jax.perf.measure`, which
``python -m sean_jax.benchmark`` uses too."""

from sean_jax.perf.measure import (  # noqa: F401
    RESULTS_DIR, interleaved_medians, machine_info, matmul_gflops, median_seconds,
    results_row, write_results)
