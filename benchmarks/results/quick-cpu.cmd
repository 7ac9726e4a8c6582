python -m benchmarks
