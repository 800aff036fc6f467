import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter (set before Triton is
# imported), so the core test matrix covers the triton backend everywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastbn  # noqa: E402
from fastbn import backends  # noqa: E402

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
