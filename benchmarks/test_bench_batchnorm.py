"""pytest-benchmark suite: every op of fastbn.bench.OPS, stock torch and fastbn's CPU
backends (reference, and cpu where built), on two CPU shapes (the runner, `python -m
benchmarks --backend triton`, measures CUDA).

    pytest benchmarks/ --benchmark-only                 # timings (pytest-benchmark stats)
    pytest benchmarks/ -q --benchmark-disable           # smoke: each case runs once

Not part of `pytest` / `pytest tests` (testpaths = tests). pytest-benchmark times each
case on its own, not interleaved, so on a shared machine prefer `python -m benchmarks`
for ratios; this suite feeds pytest-benchmark's history and --benchmark-compare.
"""

import pytest
import torch

from fastbn import backends, bench

IMPLS = ["stock"] + [name for name in ("reference", "cpu") if backends.availability(name)[0]]
# One conv-like and one 1d shape, small enough that --benchmark-disable stays quick.
SHAPES = ["32x256x14x14", "1024x512"]


@pytest.fixture(scope="module", params=SHAPES)
def inputs(request):
    return bench.make_inputs(*bench.parse_shape(request.param), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op_name", list(bench.OPS))
def test_batch_norm(benchmark, op_name, impl, inputs, request):
    cand = bench.candidate(impl)
    call, _ = bench.prepare(cand, bench.OPS[op_name], inputs)
    benchmark.group = f"{op_name} {request.node.callspec.params['inputs']}"
    with cand.context():
        benchmark(call)
