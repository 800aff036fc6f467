import pytest
import torch

import fastbn
from fastbn import backends

# Every backend that can run on this machine's CPU; "triton" joins when
# TRITON_INTERPRET=1 is set and Triton is installed.
CPU_BACKENDS = [name for name in ("reference", "cpu", "triton")
                if backends.availability(name)[0]
                and (name != "triton" or backends.load("triton").runs_on_cpu())]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Run the test once per available backend, selected explicitly."""
    with fastbn.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models on shared cores run many times faster on one thread; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
