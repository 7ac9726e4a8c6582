python -m benchmarks --results
