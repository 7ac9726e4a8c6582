python -m benchmarks --preset cpu-goals --steps 2 --repeats 6
