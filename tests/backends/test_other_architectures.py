"""The C++ kernels built for AArch64 and run under qemu, against the reference backend.

The kernels have an AArch64 path of their own (its float16 type is the ISA's, and none
of the x86 vector code is compiled), which this machine cannot run natively. Each case
runs the cpu backend here with a recorder around fastbn._C: every kernel call is written
down with the memory it reads and writes, replayed by `replay_kernels.cpp` compiled for
AArch64 with the extension's flags, and the replayed outputs are checked as the native
ones are (test_cpu_kernels.py). Needs g++-aarch64-linux-gnu and qemu-user (`.ci/run`
installs both); skipped without them.
"""

import ast
import contextlib
import ctypes
import os
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastbn._C")

from fastbn.backends import cpu, reference  # noqa: E402
from tests.backends.kernel_checks import (HALF, K_OPS, OPS,  # noqa: E402
                                          as_tuple as _tuple, call as _call,
                                          upcast as _upcast)
from tests.backends.test_cpu_kernels import (BIG, DTYPES, LAYOUTS, _check,  # noqa: E402
                                             _problem, native)  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[2]
COMPILER = "aarch64-linux-gnu-g++"
# An address is any integer argument from here up; smaller ones are codes, counts, sizes.
MIN_ADDRESS = 1 << 16


def _setup_compile_args():
    """setup.py's COMPILE_ARGS, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                getattr(target, "id", None) == "COMPILE_ARGS" for target in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no COMPILE_ARGS")


def _emulator():
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


@pytest.fixture(scope="module")
def replayer(tmp_path_factory):
    """The path of replay_kernels built for AArch64's baseline ISA (statically linked,
    so that qemu needs no AArch64 libraries)."""
    if shutil.which(COMPILER) is None or _emulator() is None:
        pytest.skip(f"needs {COMPILER} and qemu-aarch64 (Debian: g++-aarch64-linux-gnu, "
                    "qemu-user-static)")
    out = tmp_path_factory.mktemp("aarch64")
    flags = ["-std=c++17", *_setup_compile_args(), f"-I{ROOT / 'csrc'}"]
    sources = [*sorted((ROOT / "csrc" / "cpu").glob("*.cpp")),
               Path(__file__).with_name("replay_kernels.cpp")]

    def compile_one(source):
        obj = out / f"{source.stem}.o"
        done = subprocess.run([COMPILER, *flags, "-c", str(source), "-o", str(obj)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{source.name}:\n{done.stderr[-6000:]}"
        return str(obj)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, sources))
    binary = out / "replay_kernels"
    done = subprocess.run([COMPILER, "-static", "-pthread", *objects, "-o", str(binary)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-6000:]
    return binary


class _Region:
    """The memory of one tensor's storage that a call reads or writes."""

    def __init__(self, tensor):
        storage = tensor.untyped_storage()
        self.base, self.size = storage.data_ptr(), storage.nbytes()

    def holds(self, address):
        return self.base <= address < self.base + self.size


class _Recorder:
    """Stands in for fastbn._C: runs each kernel and writes the call down, its inputs'
    memory as it was before the call. Addresses resolve to the storage of a tensor
    among `inputs` (a problem's tensors, and the per-channel conversions the backend
    makes: `convert` stands in for cpu._acc) or, once the op has returned, its
    outputs."""

    def __init__(self, extension, inputs):
        self.extension, self.inputs, self.calls = extension, list(inputs), []
        self._acc = cpu._acc

    def convert(self, t, dtype):
        out = self._acc(t, dtype)
        self.inputs.append(out)
        return out

    def __getattr__(self, name):
        kernel = getattr(self.extension, name)
        if name not in OPS:
            return kernel

        def record(*args):
            self.calls.append(_Call(name, args, self.inputs))
            return kernel(*args)
        return record


class _Call:
    """One kernel call: its arguments, and the storages its addresses fall in (regions,
    and a tensor of each) with their bytes before the call (zeros for outputs)."""

    def __init__(self, name, args, inputs):
        self.name, self.args, self.regions, self.tensors = name, args, [], []
        self.before = []
        for address in self._addresses():
            self._region_of(address, inputs, snapshot=True)

    def _addresses(self):
        for a in self.args:
            v = a[0] if type(a) is tuple and len(a) == 5 else a   # a TD's address
            if type(v) is int and v >= MIN_ADDRESS:
                yield v

    def _region_of(self, address, tensors, snapshot):
        for i, region in enumerate(self.regions):
            if region.holds(address):
                return i
        for t in tensors:
            if isinstance(t, torch.Tensor) and _Region(t).holds(address):
                region = _Region(t)
                self.regions.append(region)
                self.tensors.append(t)
                self.before.append(ctypes.string_at(region.base, region.size) if snapshot
                                   else bytes(region.size))
                return len(self.regions) - 1
        return None

    def resolve_outputs(self, outputs):
        for address in self._addresses():
            if self._region_of(address, outputs, snapshot=False) is None:
                raise AssertionError(f"{self.name}: an address outside its inputs and "
                                     "outputs (a temporary the recorder cannot see)")

    def _encode_address(self, address):
        i = self._region_of(address, (), snapshot=False)
        return struct.pack("<iQ", i, address - self.regions[i].base)

    def _encode(self, value):
        if type(value) is bool:
            return b"b" + struct.pack("<B", value)
        if type(value) is float:
            return b"d" + struct.pack("<d", value)
        if type(value) is int:
            if value >= MIN_ADDRESS:
                return b"p" + self._encode_address(value)
            return b"i" + struct.pack("<q", value)
        if len(value) == 5:   # (address, sK, sN, sC, sL)
            address = (self._encode_address(value[0]) if value[0] >= MIN_ADDRESS
                       else struct.pack("<iQ", -1, 0))
            return b"t" + address + struct.pack("<4q", *value[1:])
        # (N, C, L, cl, fold, tile)
        return b"g" + struct.pack("<6q", *(int(v) for v in value))

    def encode(self):
        name = self.name.encode()
        out = [struct.pack("<I", len(name)), name, struct.pack("<I", len(self.regions))]
        for region, before in zip(self.regions, self.before):
            out += [struct.pack("<Q", region.size), before]
        out.append(struct.pack("<I", len(self.args)))
        out += [self._encode(a) for a in self.args]
        return b"".join(out)


def _replay(binary, calls, tmp_path):
    """Each recorded call run by the AArch64 build: {id(tensor): its replayed value}."""
    calls_in, regions_out = tmp_path / "calls.bin", tmp_path / "regions.bin"
    encoded = b"".join(c.encode() for c in calls)
    calls_in.write_bytes(struct.pack("<I", len(calls)) + encoded)
    done = subprocess.run([_emulator(), str(binary), str(calls_in), str(regions_out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    data, at, replayed = regions_out.read_bytes(), 0, []
    for c in calls:
        values = {}
        for region, t in zip(c.regions, c.tensors):
            raw = bytearray(data[at:at + region.size])
            at += region.size
            whole = (torch.frombuffer(raw, dtype=t.dtype) if raw
                     else torch.empty(0, dtype=t.dtype))
            values[id(t)] = whole.as_strided(t.shape, t.stride(), t.storage_offset())
        replayed.append(values)
    assert at == len(data)
    return replayed


@contextlib.contextmanager
def _recording(monkeypatch, recorder):
    """The cpu backend's calls recorded by `recorder` inside the block."""
    with monkeypatch.context() as patch:
        patch.setattr(cpu, "_C", recorder)
        patch.setattr(cpu, "_acc", recorder.convert)
        yield


@pytest.mark.slow
@pytest.mark.parametrize("layout,dtype",
                         [(layout, dtype) for layout in LAYOUTS for dtype in DTYPES]
                         + [(layout, torch.float32) for layout in BIG], ids=str)
def test_aarch64_build_matches_reference(native, monkeypatch, replayer, tmp_path, layout,
                                         dtype):
    cases = []   # (op, act, k, problem, outputs, call)
    for op in OPS:
        for act in (None, "relu"):
            for k in (None, 3) if op in K_OPS else (None,):
                p = _problem(layout, dtype, k, half_weight_fp32=(layout == "nchw"))
                recorder = _Recorder(cpu._C, p.values())
                with _recording(monkeypatch, recorder):
                    out = _tuple(_call(cpu, op, p, act))
                (recorded,) = recorder.calls
                recorded.resolve_outputs(out)
                cases.append((op, act, k, p, out, recorded))
    # The running statistics updated in place.
    p = _problem(layout, dtype, None, seed=1, half_weight_fp32=(layout == "nchw"))
    running = [torch.rand(p["x"].shape[1], dtype=p["weight"].dtype) for _ in range(2)]
    mean, var, _ = reference.statistics(p["x"], 1e-5)
    expected = [t.clone() for t in running]
    reference.update_running_stats(*expected, mean, var, p["x"].numel() // p["x"].shape[1],
                                   0.1)
    recorder = _Recorder(cpu._C, [*p.values(), *running])
    with _recording(monkeypatch, recorder):
        out = cpu.forward_train(p["x"], p["weight"], p["bias"], 1e-5, None, *running, 0.1)
    (recorded,) = recorder.calls
    recorded.resolve_outputs(out)
    replayed = _replay(replayer, [c[-1] for c in cases] + [recorded], tmp_path)

    for (op, act, k, p_op, out_op, _), values in zip(cases, replayed):
        got = tuple(values[id(t)] for t in out_op)
        ref = _call(reference, op, p_op, act)
        ref64 = _call(reference, op, _upcast(p_op), act) if dtype in HALF else ref
        try:
            _check(got, ref, ref64, dtype)
        except AssertionError as err:
            raise AssertionError(f"{op}, activation {act}, K {k}: {err}") from err
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(running[0].dtype, 1e-2)
    for t, want in zip(running, expected):
        torch.testing.assert_close(replayed[-1][id(t)], want, rtol=tol, atol=tol)
