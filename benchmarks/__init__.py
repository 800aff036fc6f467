"""fastbn benchmarks: `python -m benchmarks` (runner, fastbn/bench.py) and the
pytest-benchmark suite (`pytest benchmarks/ --benchmark-only`)."""
