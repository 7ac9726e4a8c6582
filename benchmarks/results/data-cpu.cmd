python -m benchmarks.data --images 160 --repeats 4 --out data-cpu
