"""Throughput benchmarks: our EfficientNet variants and the peers a user would pick instead,
measured side by side in one process under identical settings (see docs/benchmarks.md)."""

import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # committed reports
# Where a plain `make bench` writes: the project's runs/ folder, which git ignores, so measuring
# never changes a committed report by accident (`make bench-report` / --results does, on purpose).
SCRATCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "bench")
