"""`python -m benchmarks ...` from the repository root: the same runner as `fastbn bench`."""

from fastbn.bench import main

main(prog="python -m benchmarks")
