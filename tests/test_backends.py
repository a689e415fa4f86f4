"""Tests of mgc_kernels.backends (backend choice, errors, the CUDA fallback warning) and of the
``python -m mgc_kernels.env`` report."""

import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import mgc_kernels as mk
from mgc_kernels import backends, env, native

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
CONCRETE = ("torch", "triton", "native")
_fresh = itertools.count()


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    """Every test starts from the default backend, whatever the caller's shell sets."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def fresh_op():
    return f"test_backends_op_{next(_fresh)}"


def views(b=2):
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [10.0, 20.0, 90.0, 120.0]])[:b]
    flips = torch.tensor([False, True])[:b]
    return boxes, flips, boxes.flip(0).contiguous(), flips.flip(0).contiguous()


def embeddings(n=4, d=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.arange(n)


# ---------------------------------------------------------------- resolve on CPU


NATIVE_OPS = ("correspondence", "multigrain_pool", "sample_pairs")  # the ops csrc/ has
OTHER_OPS = ("geometric_info_nce", "info_nce", "linear_soft_ce", "region_boxes")


class _FakeExtension:
    with_cuda = False


def _no_build():
    raise AssertionError("auto must never compile the native extension")


@pytest.fixture
def native_found(monkeypatch):
    """The native loader as after finding a finished build (and unable to compile)."""
    monkeypatch.setattr(native, "_loaded", [(_FakeExtension(), "built in (a test)")])
    monkeypatch.setattr(native, "_build", _no_build)


@pytest.fixture
def native_unbuilt(monkeypatch):
    """The native loader as on a machine where nothing is built yet (and unable to compile)."""
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native, "_not_loaded", ["not built yet (a test)"])
    monkeypatch.setattr(native, "_build_failed", [])
    monkeypatch.setattr(native, "_build", _no_build)


@pytest.mark.parametrize("op", NATIVE_OPS + OTHER_OPS)
def test_auto_on_cpu_without_a_native_build_is_torch_and_compiles_nothing(op, native_unbuilt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for CPU tensors
        assert backends.resolve(op, "auto", CPU) == "torch"
        assert backends.resolve(op, None, CPU) == "torch"


@pytest.mark.parametrize("op", NATIVE_OPS)
def test_auto_on_cpu_uses_a_finished_native_build(op, native_found):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve(op, "auto", CPU) == "native"
        assert backends.resolve(op, None, CPU) == "native"
    assert backends.resolve(op, "auto", CPU, torch.float64) == "torch"  # the fp64 spec
    assert backends.resolve(op, "auto", torch.device("meta")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDA keeps its rule: triton, else the reference
        assert backends.resolve(op, "auto", CUDA) in ("triton", "torch")


@pytest.mark.parametrize("op", OTHER_OPS)
def test_auto_on_cpu_keeps_torch_for_ops_without_cpp_kernels(op, native_found):
    assert backends.resolve(op, "auto", CPU) == "torch"


def test_the_cpp_kernels_are_the_registered_native_ops():
    assert {op for op in backends.registered_ops() if (op, "native") in backends._IMPLS} == set(
        NATIVE_OPS
    )


def test_explicit_torch_runs():
    assert backends.resolve("info_nce", "torch", CPU) == "torch"
    q, k, t = embeddings()
    loss = mk.info_nce(q, k, t, backend="torch")
    assert torch.equal(loss, mk.info_nce(q, k, t))
    w = mk.correspondence(*views(), grid=4, backend="torch")
    assert w.shape == (2, 16, 16)


def test_explicit_torch_without_implementation_says_so():
    op = fresh_op()
    with pytest.raises(RuntimeError, match=f"{op}.*no implementation"):
        backends.resolve(op, "torch", CPU)


def test_explicit_triton_raises_when_it_cannot_load(monkeypatch):
    # whether or not triton is installed here, simulate a machine where it does not import
    why = "triton is not installed (pip install 'mgc_kernels[triton]')"
    monkeypatch.setattr(backends, "_triton_version", lambda: (None, why))
    assert backends.backend_status("triton") == (False, why)
    with pytest.raises(RuntimeError, match=f"info_nce.*'triton'.*{re.escape(why)}"):
        backends.resolve("info_nce", "triton", CPU)
    q, k, t = embeddings()
    with pytest.raises(RuntimeError, match=f"info_nce.*{re.escape(why)}"):
        mk.info_nce(q, k, t, backend="triton")
    with pytest.raises(RuntimeError, match=f"correspondence.*{re.escape(why)}"):
        mk.correspondence(*views(), grid=4, backend="triton")


def test_explicit_native_without_the_op_raises():
    """The native backend has the geometry and pooling ops only: an InfoNCE request names the
    op and the backend (whether or not the extension builds here)."""
    q, k, t = embeddings()
    with pytest.raises(RuntimeError, match="info_nce.*'native'"):
        mk.info_nce(q, k, t, backend="native")


def _names_valid(message):
    return all(repr(b) in message for b in backends.BACKENDS)


@pytest.mark.parametrize(
    "call",
    [
        lambda: mk.correspondence(*views(), grid=4, backend="cuda"),
        lambda: mk.info_nce(*embeddings(), backend="bogus"),
        lambda: mk.region_boxes(*views()[:2], grid=4, backend="gpu"),
        lambda: backends.resolve("info_nce", "", CPU),
    ],
    ids=["correspondence-cuda", "info_nce-bogus", "region_boxes-gpu", "resolve-empty"],
)
def test_unknown_backend_per_call(call):
    with pytest.raises(ValueError, match="backend must be one of") as e:
        call()
    assert _names_valid(str(e.value))


@pytest.mark.parametrize("value", ["bogus", "cuda"])
def test_unknown_backend_from_env(monkeypatch, value):
    monkeypatch.setenv(backends.ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{backends.ENV_VAR}.*{value}") as e:
        mk.info_nce(*embeddings())
    assert _names_valid(str(e.value))
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        mk.correspondence(*views(), grid=4)
    # an explicit per-call backend does not read the environment
    assert backends.resolve("info_nce", "torch", CPU) == "torch"


def test_env_backend_is_honoured(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.default_backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit torch on CUDA: no fallback warning
        assert backends.resolve("info_nce", None, CUDA) == "torch"
    q, k, t = embeddings()
    assert torch.equal(mk.info_nce(q, k, t), mk.info_nce(q, k, t, backend="torch"))

    monkeypatch.setenv(backends.ENV_VAR, " Native ")  # trimmed, case-insensitive
    assert backends.default_backend() == "native"
    with pytest.raises(RuntimeError, match="info_nce.*'native'"):
        mk.info_nce(q, k, t)
    assert mk.info_nce(q, k, t, backend="auto").isfinite()  # per call overrides the env

    monkeypatch.setenv(backends.ENV_VAR, "")
    assert backends.default_backend() == "auto"


@pytest.mark.parametrize("name", ["auto", "cuda", "bogus", "TORCH"])
def test_register_rejects_unknown_backend(name):
    op = fresh_op()
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.register(op, name)
    assert not any(key[0] == op for key in backends._IMPLS)


def test_backend_status():
    assert backends.backend_status("torch") == (True, f"PyTorch {torch.__version__}")
    loads, why = backends.backend_status("native")
    assert why and (not loads or "built in" in why or "ahead-of-time" in why)
    loads, why = backends.backend_status("triton")
    if importlib.util.find_spec("triton") is None:
        assert not loads and "not installed" in why
    with pytest.raises(ValueError):
        backends.backend_status("bogus")


# ---------------------------------------------------------------- CUDA fallback without a GPU


def test_cuda_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(backends, "_warned_fallback", set())
    op = fresh_op()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends._auto(op, CUDA) == "torch"
        assert backends._auto(op, CUDA) == "torch"
    fallback = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert op in str(fallback[0].message) and "torch reference" in str(fallback[0].message)

    other = fresh_op()  # the warning is once per op, not once per process
    with pytest.warns(RuntimeWarning, match=other):
        assert backends._auto(other, CUDA) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends._auto(other, CPU) == "torch"


def test_cuda_fallback_through_resolve(monkeypatch):
    op = fresh_op()  # an op with a reference but no Triton kernel
    backends.register(op, "torch")(lambda: None)
    with pytest.warns(RuntimeWarning, match=op):
        assert backends.resolve(op, "auto", CUDA) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve(op, None, CUDA) == "torch"


# ---------------------------------------------------------------- python -m mgc_kernels.env


def test_report_in_process_is_silent_and_keeps_fallback_warnings(monkeypatch):
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = env.report()
    assert backends._warned_fallback == set()  # the user's first CUDA call still warns
    for op in ("info_nce", "correspondence", "multigrain_pool"):
        assert op in text
    assert "info_nce_backward" not in text
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    assert "bogus" in env.report()


def run_env(**extra):
    proc_env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    proc_env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "mgc_kernels.env"],
        capture_output=True,
        text=True,
        env=proc_env,
        timeout=120,
    )


def test_env_module_runs():
    proc = run_env()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert torch.__version__ in out and mk.__version__ in out
    assert "triton" in out and "auto" in out
    for name in CONCRETE:
        assert name in out
    assert re.search(r"^  native +(yes +(built in|ahead-of-time)|no +\S)", out, re.M), out
    assert backends.backend_status("triton")[1] in out
    assert proc.stderr == ""  # no stray warnings, tracebacks or build output


def test_env_module_reports_bad_env_var():
    proc = run_env(**{backends.ENV_VAR: "bogus"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("default backend"))
    assert "bogus" in line and backends.ENV_VAR in line and "must be one of" in line


class _FakeTritonError(Exception):
    pass


_FakeTritonError.__module__ = "triton.compiler.errors"


def test_triton_failure_names_op_shapes_device_and_version(monkeypatch):
    def broken(x, n):
        raise _FakeTritonError("out of shared memory")

    op = fresh_op()
    backends.register(op, "triton")(broken)
    x = torch.zeros(3, 4, dtype=torch.float16)
    with pytest.raises(
        RuntimeError,
        match=rf"{op}: the Triton kernel failed for inputs "
        r"\[\(3, 4\) float16\] on .*Triton .*out of shared",
    ):
        backends.call(op, "triton", x, 5)


def test_non_triton_errors_pass_through():
    def broken(x):
        raise KeyError("a bug of ours")

    op = fresh_op()
    backends.register(op, "triton")(broken)
    with pytest.raises(KeyError):
        backends.call(op, "triton", torch.zeros(1))


# ---------------------------------------------------------------- native backend that cannot load


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native loader with nothing loaded yet, an empty extension cache, no ahead-of-time
    build, and csrc/ replaced by ``tmp_path / "csrc"``."""
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native, "_not_loaded", [])
    monkeypatch.setattr(native, "_build_failed", [])
    monkeypatch.setattr(native, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(native, "JIT_NAME", "mgc_kernels_native_test_broken")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "mgc_kernels._native", None)  # import -> ImportError
    return native


def _assert_unavailable_once(native, reason):
    with pytest.warns(RuntimeWarning, match=f"native backend is unavailable: .*{reason}"):
        loads, why = backends.backend_status("native")
    assert not loads and re.search(reason, why)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per call
        with pytest.raises(RuntimeError, match=f"correspondence.*'native'.*{reason}"):
            mk.correspondence(*views(), grid=4, backend="native")
    assert "native" in backends.BACKENDS and mk.correspondence(*views(), grid=4).shape[0] == 2


def test_native_without_sources_is_unavailable_not_a_crash(fresh_native):
    _assert_unavailable_once(fresh_native, "csrc/ sources are not at")


def test_native_failed_build_is_unavailable_not_a_crash(fresh_native):
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("ninja is not installed: the build is not attempted")
    fresh_native.CSRC.mkdir()
    (fresh_native.CSRC / "broken.cpp").write_text("this is not C++\n")
    _assert_unavailable_once(fresh_native, "building csrc/ failed")


def test_a_cached_build_is_named_by_its_sources_and_torch(fresh_native, monkeypatch):
    shutil.copytree(native.PACKAGE.parent / "csrc", fresh_native.CSRC)
    first = fresh_native.build_dir(cuda=False)
    assert first.parent == fresh_native.cache_root() and first != fresh_native.build_dir(True)
    (fresh_native.CSRC / "native.h").write_text("// changed\n", encoding="utf-8")
    edited = fresh_native.build_dir(cuda=False)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert len({first, edited, fresh_native.build_dir(cuda=False)}) == 3


def test_a_cached_build_that_does_not_import_is_not_used(fresh_native):
    shutil.copytree(native.PACKAGE.parent / "csrc", fresh_native.CSRC)
    folder = fresh_native.build_dir(cuda=False)
    folder.mkdir(parents=True)
    (folder / f"{folder.name}.so").write_bytes(b"not a shared object")
    (folder / fresh_native.BUILT).write_text("")
    loads, why = fresh_native.status(build=False)
    assert not loads and "does not import" in why and str(folder) in why
    assert backends.resolve("sample_pairs", "auto", CPU) == "torch"


def test_a_half_finished_build_is_not_used(fresh_native):
    """A folder without the stamp (a build killed before it loaded) does not count."""
    shutil.copytree(native.PACKAGE.parent / "csrc", fresh_native.CSRC)
    folder = fresh_native.build_dir(cuda=False)
    folder.mkdir(parents=True)
    (folder / f"{folder.name}.so").write_bytes(b"half a shared object")
    loads, why = fresh_native.status(build=False)
    assert not loads and why.startswith("not built yet") and native.BUILD_COMMAND in why


def _python(code, **extra):
    proc_env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    proc_env.update(extra)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=proc_env, timeout=300
    )


RESOLVE_IN_A_NEW_PROCESS = """
import torch, mgc_kernels as mk
from mgc_kernels import native
print(mk.backends.resolve("sample_pairs", None, torch.device("cpu")))
print(native.status(build=False)[1])
"""


def test_a_new_process_uses_the_finished_build_without_compiling():
    loads, why = backends.backend_status("native")  # builds here on first use, if it must
    if not loads:
        pytest.skip(f"the native backend does not build here: {why}")
    built = [p for p in native.cache_root().glob(f"{native.JIT_NAME}*/*.so")]
    mtimes = {p: p.stat().st_mtime_ns for p in built}
    proc = _python(RESOLVE_IN_A_NEW_PROCESS)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    pick, how = proc.stdout.splitlines()
    assert pick == "native" and (how.startswith("built in") or how == "ahead-of-time build")
    assert {p: p.stat().st_mtime_ns for p in built} == mtimes  # nothing recompiled


def test_auto_in_a_new_process_without_a_build_compiles_nothing(tmp_path):
    if importlib.util.find_spec("mgc_kernels._native") is not None:
        pytest.skip("an ahead-of-time build is installed here")
    proc = _python(
        RESOLVE_IN_A_NEW_PROCESS
        + """
w = mk.correspondence(torch.tensor([[0., 0., 64., 64.]]), torch.tensor([False]),
                      torch.tensor([[8., 8., 72., 72.]]), torch.tensor([True]), grid=4)
print(tuple(w.shape))
""",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [
        "torch",
        f"not built yet ({native.BUILD_COMMAND} builds it, in a minute or two)",
        "(1, 16, 16)",
    ]
    assert not any(tmp_path.iterdir())


def test_import_and_nvcc_probe_print_nothing():
    """torch logs "No CUDA runtime is found" when its extension helper is imported on a machine
    without a GPU; the library keeps that line out of a user's output."""
    proc = _python(
        "import mgc_kernels; from mgc_kernels import native; native.nvcc_found()",
        CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"),
    )
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr


def test_build_native_flag_reports_the_build(native_unbuilt, monkeypatch, capsys):
    monkeypatch.setattr(native, "_cuda_wanted", lambda: False)
    monkeypatch.setattr(native, "_build", lambda: (_FakeExtension(), "built in (a test)"))
    assert env.main(["--build-native"]) == 0
    out = capsys.readouterr().out
    assert "built: built in (a test)" in out
    assert re.search(r"^  sample_pairs +native", out, re.M), out


def test_build_native_flag_fails_loudly(native_unbuilt, monkeypatch, capsys):
    monkeypatch.setattr(native, "_cuda_wanted", lambda: False)
    monkeypatch.setattr(native, "_build", lambda: (None, "building csrc/ failed: boom"))
    assert env.main(["--build-native"]) == 1
    out = capsys.readouterr().out
    assert "the build failed: building csrc/ failed: boom" in out
    assert re.search(r"^  sample_pairs +torch", out, re.M), out
