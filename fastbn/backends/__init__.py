"""Backend registry and selection.

A backend is a module with the kernel functions documented in `reference.py` plus
`name` and `available() -> (bool, reason)`. The op layer asks `select(x)` for the backend
of each call; nothing above it knows which one ran.

Selection: `set_backend(name)`, the context manager `use_backend(name)`, or the
environment variable FASTBN_BACKEND (read on first use); names are "auto", "reference",
"cpu", "triton". "auto" takes the compiled CPU kernels for CPU tensors and Triton for
CUDA tensors when they are available, and the reference backend otherwise.
"""

import contextlib
import functools
import importlib
import os
import threading

NAMES = ("auto", "reference", "cpu", "triton")
_MODULES = {"reference": "fastbn.backends.reference",
            "cpu": "fastbn.backends.cpu",
            "triton": "fastbn.backends.triton"}


class _ThreadState(threading.local):
    # A class default: getattr(state, "name", None) on a thread that never set one
    # raised and caught an AttributeError on every op call.
    name = None   # this thread's set_backend choice; None: FASTBN_BACKEND's


_state = _ThreadState()
_loaded = {}          # name -> module, or None when the import failed
_import_errors = {}   # name -> why the import failed


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown fastbn backend {name!r}; expected one of {', '.join(NAMES)}")


def load(name):
    """The backend module `name` (not "auto"), or None if it cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except (ImportError, ValueError) as err:   # ValueError: a bad setting
            _loaded[name] = None
            _import_errors[name] = f"{type(err).__name__}: {err}"
    return _loaded[name]


def availability(name):
    """(available, reason) for a backend name other than "auto"."""
    _check_name(name)
    module = load(name)
    if module is None:
        return False, _import_errors.get(name, "not importable")
    try:
        return module.available()
    except Exception as err:  # noqa: BLE001 - a broken probe means "not available"
        return False, f"availability check failed: {type(err).__name__}: {err}"


_verified = {}   # name -> the loaded module that passed its availability check


def _require(name):
    module = _loaded.get(name)
    if module is None or _verified.get(name) is not module:
        ok, why = availability(name)
        if not ok:
            raise RuntimeError(f"fastbn backend {name!r} is not available: {why}")
        module = _verified[name] = load(name)
    return module


@functools.cache
def _environment_backend():
    """FASTBN_BACKEND, read once (os.environ costs a microsecond a call)."""
    name = os.environ.get("FASTBN_BACKEND", "auto") or "auto"
    _check_name(name)
    return name


def get_backend():
    """The name of the selected backend ("auto" unless set)."""
    return _state.name or _environment_backend()


def set_backend(name):
    """Select the backend for this thread; raises if it is not available here."""
    _check_name(name)
    if name != "auto":
        _require(name)
    _state.name = name


class use_backend(contextlib.ContextDecorator):
    """Select a backend inside a `with` block (restored afterwards). A class rather than
    a generator: entering it costs a few microseconds less, per call where a caller
    switches backends around each op (the benchmark runner does)."""

    def __init__(self, name):
        self.name = name
        self._previous = []   # a stack: one object may be entered again inside itself

    def __enter__(self):
        previous = _state.name
        set_backend(self.name)
        self._previous.append(previous)

    def __exit__(self, *exc_info):
        _state.name = self._previous.pop()


_auto = {}   # device type -> the backend "auto" picks there (probed once: microseconds a call)


def select(x):
    """The backend module that runs an op on tensor x."""
    # get_backend() inline: this runs on every call.
    name = _state.name or _environment_backend()
    if name != "auto":
        return _require(name)
    device = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
    backend = _auto.get(device)
    if backend is None:
        if device == "cuda" and availability("triton")[0]:
            backend = load("triton")
        elif device == "cpu" and availability("cpu")[0]:
            backend = load("cpu")
        else:
            backend = load("reference")
        _auto[device] = backend
    return backend
