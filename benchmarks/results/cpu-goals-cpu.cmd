python -m benchmarks --results --preset cpu-goals --steps 2 --repeats 6
