"""Throughput benchmarks: our EfficientNet variants and the peers a user would pick instead,
measured side by side in one process under identical settings (see docs/benchmarks.md)."""
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
