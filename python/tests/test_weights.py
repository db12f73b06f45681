"""The shared weights in Python, through client mode (a plain Python process connecting to a
running ``zygote start --workers 0``): every tensor aliases the shared mapping, numpy views are
read-only, a tensor keeps the mapping alive, a write faults loudly, and the package outside
a worker says how to use it."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import model_dir

import zygote


@pytest.fixture
def no_workers(service):
    s = service(["--model", str(model_dir())], workers=0)
    s.wait_serving()
    return s


def test_tensors_alias_the_shared_mapping(no_workers):
    from safetensors.torch import load_file

    w = zygote.connect(no_workers.runtime_dir).weights()
    assert w.backend == "host" and w.device == "cpu"
    file = load_file(str(model_dir() / "model.safetensors"))
    assert set(w) == set(file)
    ((start, size),) = w.ranges()
    for name, t in w.items():
        assert start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + size, name
        assert t.data_ptr() == w.tensor(name).data_ptr
        assert torch.equal(t, file[name]), name
    # The mapping is the model memfd itself, not a copy (host backend, f32 model).
    maps = open("/proc/self/maps").read().splitlines()
    mine = [m for m in maps if int(m.split("-")[0], 16) == start]
    assert mine and "memfd:zygote-model" in mine[0] and mine[0].split()[1].startswith("r--s")


def test_numpy_views_are_read_only(no_workers):
    w = zygote.connect(no_workers.runtime_dir).weights()
    name = "embeddings.word_embeddings.weight"
    a = w.numpy(name)
    assert not a.flags.writeable
    assert a.ctypes.data == w.tensor(name).data_ptr
    with pytest.raises(ValueError):
        a[...] = 0
    with pytest.raises(ValueError):
        a.setflags(write=True)
    # A consumer that asks for a writable buffer is refused.
    with pytest.raises(TypeError, match="read-write"):
        io.BytesIO(b"x").readinto(w.tensor(name))
    view = memoryview(w.tensor(name))
    assert view.readonly and view.format == "f" and view.shape == (30522, 384)
    with pytest.raises(TypeError):
        view[0, 0] = 1.0  # type: ignore[index]


def test_both_capsule_kinds_alias_the_same_bytes(no_workers):
    w = zygote.connect(no_workers.runtime_dir).weights()
    shared = w.tensor("encoder.layer.0.attention.self.query.weight")
    assert shared.__dlpack_device__() == (1, 0)
    legacy = torch.from_dlpack(shared.__dlpack__())
    versioned = torch.from_dlpack(shared.__dlpack__(max_version=(1, 0)))
    for t in (legacy, versioned):
        assert t.data_ptr() == shared.data_ptr and t.shape == (384, 384)
        assert t.dtype == torch.float32
    with pytest.raises(BufferError, match="without copying"):
        shared.__dlpack__(copy=True)
    with pytest.raises(BufferError, match="lives on DLPack device"):
        shared.__dlpack__(dl_device=(2, 0))


def test_a_tensor_keeps_the_mapping_alive(no_workers):
    conn = zygote.connect(no_workers.runtime_dir)
    w = conn.weights()
    name = next(iter(w))
    t = torch.from_dlpack(w.tensor(name))
    want = t.clone()
    ptr = t.data_ptr()
    del w, conn
    zygote._weights = None
    zygote._connection = None
    gc.collect()
    maps = open("/proc/self/maps").read()
    assert "memfd:zygote-model" in maps
    assert t.data_ptr() == ptr and torch.equal(t, want)
    del t
    gc.collect()


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_client_mode_from_a_plain_process(no_workers):
    out = run_python(
        f"""
        import zygote, zygote.torch, torch
        w = zygote.connect({str(no_workers.runtime_dir)!r}).weights()
        t = w["embeddings.word_embeddings.weight"]
        print(len(w), w.generation, tuple(t.shape), w.contains(t.data_ptr()))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["104", "1", "(30522,", "384)", "True"]


def test_a_write_into_a_shared_weight_faults_loudly(no_workers):
    out = run_python(
        f"""
        import faulthandler, zygote, torch
        faulthandler.enable(); torch.set_num_threads(1)
        w = zygote.connect({str(no_workers.runtime_dir)!r}).weights()
        w["embeddings.word_embeddings.weight"].add_(1)
        print("wrote")
        """
    )
    assert out.returncode == -11, (out.returncode, out.stdout, out.stderr)
    assert "wrote" not in out.stdout
    # One intra-op thread: with several, two may fault at once, and the second fault ends the
    # process while faulthandler still writes the first one's report (PYTHON.md, "Writes").
    # faulthandler names the line that wrote (line 5 of the program above).
    assert "Segmentation fault" in out.stderr and 'File "<string>", line 5' in out.stderr


def test_outside_a_worker_the_error_names_the_fix():
    out = run_python("import zygote; zygote.weights()")
    assert out.returncode != 0
    assert "NotAttachedError" in out.stderr
    assert "zygote start --model PATH --app MODULE:ATTR" in out.stderr
    assert "zygote.connect()" in out.stderr


def test_connect_without_a_service_names_the_fix(tmp_path):
    with pytest.raises(zygote.ZygoteError, match="Start the service first"):
        zygote.connect(tmp_path, timeout=0).weights()


def test_client_mode_with_a_converted_compute_copy(service, tmp_path):
    # An f16 file: the owner widens it to an f32 compute copy in its own memfd, so the client
    # checks that copy against the model file (not the model memfd itself).
    from safetensors.torch import save_file

    torch.manual_seed(1)
    half = {"a.weight": torch.randn(64, 32).half(), "b.bias": torch.randn(7).half()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    s = service(["--model", str(path)], workers=0)
    s.wait_serving()
    w = zygote.connect(s.runtime_dir).weights()
    assert w.tensor("a.weight").dtype == "F32"
    for name, t in half.items():
        assert w[name].dtype == torch.float32
        assert torch.equal(w[name], t.float()), name
        assert w.contains(w[name].data_ptr())
    maps = open("/proc/self/maps").read()
    assert "memfd:zygote-weights" in maps
