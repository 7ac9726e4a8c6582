"""Throughput benchmarks: our EfficientNet variants and the peers a user would pick instead,
measured side by side in one process under identical settings (see README: Benchmarks)."""
