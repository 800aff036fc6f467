import pytest


@pytest.fixture(autouse=True)
def _tiny_models(one_thread):
    """Every model here is tiny: run on one thread."""
