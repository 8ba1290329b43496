"""pypeft from C++: the CMake build (CMakeLists.txt) and its TorchScript runner.

A module that calls pypeft::lora_linear is traced (or scripted) and saved here;
pypeft_run, a C++ program built by CMake against the same torch, loads it and
the inputs, runs it with no Python involved, and writes the outputs back for
comparison.

The runner always runs in a subprocess: it links libpypeft_ops, which
registers the `pypeft` op namespace as pypeft._C already did in this Python
process, and a second TORCH_LIBRARY(pypeft, ...) in one process is an error.

Skipped only where cmake or a C++ compiler is missing; a failing build fails.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import pypeft  # noqa: F401  (registers torch.ops.pypeft.* in this process)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LIB_NAME = {"darwin": "libpypeft_ops.dylib"}.get(sys.platform, "libpypeft_ops.so")


def _cxx_compiler():
    cxx = os.environ.get("CXX")
    names = [cxx.split()[0]] if cxx else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def _run(cmd, **kwargs):
    """Run a build step; on failure, fail the test with its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def _cpp_env():
    """The environment for the C++ programs: nothing that points at Python."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


@dataclass
class Build:
    dir: Path
    runner: Path
    library: Path


@pytest.fixture(scope="session")
def cmake_build(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH: the CMake build and the C++ runner cannot be tested")
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler ($CXX, c++, g++ or clang++) on PATH: the CMake build cannot be tested")
    build = tmp_path_factory.mktemp("cmake-build")
    _run([cmake, "-S", ROOT, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
          "-DCMAKE_BUILD_TYPE=Release"])
    _run([cmake, "--build", build, "--parallel", "2"])
    return Build(build, build / "pypeft_run", build / LIB_NAME)


def run_cpp(runner, *args, cwd):
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True,
                          env=_cpp_env(), cwd=cwd, timeout=300)


class LoraProbe(nn.Module):
    """A frozen linear layer plus a LoRA update, as one pypeft::lora_linear call."""

    def __init__(self, in_features=16, out_features=24, r=4, scale=0.5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=g) / 4)
        self.bias = nn.Parameter(torch.randn(out_features, generator=g))
        self.lora_a = nn.Parameter(torch.randn(r, in_features, generator=g) / 4)
        # Non-zero B (PEFT starts it at zero), so the adapter changes the output.
        self.lora_b = nn.Parameter(torch.randn(out_features, r, generator=g))
        self.scale = scale

    def forward(self, x):
        return torch.ops.pypeft.lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b,
                                            self.scale, 0.0, None)[0]


class LoraProbeBoth(LoraProbe):
    """Returns the op's two outputs, y and u = x Aᵀ: a tuple through the runner."""

    def forward(self, x):
        y, u = torch.ops.pypeft.lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b,
                                            self.scale, 0.0, None)
        return y, u


def reference(m, x):
    """Plain PyTorch: x Wᵀ + b + s (x Aᵀ) Bᵀ, and u = x Aᵀ."""
    u = x @ m.lora_a.T
    return x @ m.weight.T + m.bias + m.scale * u @ m.lora_b.T, u


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def save_model(kind, tmp_path):
    """A traced or scripted probe saved as TorchScript, its inputs, and the module."""
    torch.manual_seed(0)
    if kind == "trace":
        module = LoraProbe().eval()
        x = torch.randn(2, 5, 16)
        compiled = torch.jit.trace(module, (x,))
    else:
        module = LoraProbeBoth().eval()
        x = torch.randn(5, 2, 16).transpose(0, 1)  # [2, 5, 16], not contiguous
        compiled = torch.jit.script(module)
    model, inputs = tmp_path / f"{kind}.pt", tmp_path / "inputs.pt"
    compiled.save(str(model))
    torch.save([x], inputs)
    return model, inputs, module, compiled, x


@pytest.mark.parametrize("kind", ["trace", "script"])
def test_runner_matches_python(cmake_build, tmp_path, kind):
    model, inputs, module, compiled, x = save_model(kind, tmp_path)
    outputs = tmp_path / "outputs.pt"
    proc = run_cpp(cmake_build.runner, model, inputs, outputs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(outputs)

    with torch.no_grad():
        in_python = compiled(x)
        y_ref, u_ref = reference(module, x)
    if kind == "trace":
        assert isinstance(got, torch.Tensor) and got.shape == (2, 5, 24)
        assert_close(got, in_python)
        assert_close(got, y_ref)
    else:
        assert isinstance(got, tuple) and len(got) == 2
        assert_close(got[0], in_python[0])
        assert_close(got[1], in_python[1])
        assert_close(got[0], y_ref)
        assert_close(got[1], u_ref)
    # The adapter matters: without it the output would differ.
    y = got if kind == "trace" else got[0]
    assert (y - (x @ module.weight.T + module.bias)).abs().max() > 0.1


def test_runner_loads_ops_library_given_explicitly(cmake_build, tmp_path):
    # The runner already links the library; loading that same file again is a no-op.
    model, inputs, module, _, x = save_model("trace", tmp_path)
    outputs = tmp_path / "outputs.pt"
    proc = run_cpp(cmake_build.runner, model, inputs, outputs, "--ops-library", cmake_build.library,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        assert_close(torch.load(outputs), reference(module, x)[0])

    # Another copy of it would register the pypeft namespace twice, which
    # aborts inside dlopen: the runner refuses it with a message instead.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cmake_build.library, other / LIB_NAME)
    outputs.unlink()
    proc = run_cpp(cmake_build.runner, model, inputs, outputs, "--ops-library", other / LIB_NAME,
                   cwd=tmp_path)
    assert proc.returncode == 1
    assert "a second copy would register its ops twice" in proc.stderr
    assert not outputs.exists()


def test_runner_has_no_python_in_it(cmake_build):
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("no ldd to list the runner's shared libraries")
    libs = subprocess.run([ldd, str(cmake_build.runner)], capture_output=True, text=True,
                          env=_cpp_env()).stdout
    assert LIB_NAME in libs and "libtorch_cpu" in libs
    assert "libpython" not in libs and "libtorch_python" not in libs, libs


def test_runner_fails_cleanly(cmake_build, tmp_path):
    model, inputs, _, _, _ = save_model("trace", tmp_path)
    outputs = tmp_path / "outputs.pt"
    missing = tmp_path / "missing.pt"

    proc = run_cpp(cmake_build.runner, missing, inputs, outputs, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"model file '{missing}' does not exist" in proc.stderr

    proc = run_cpp(cmake_build.runner, model, missing, outputs, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"inputs file '{missing}' does not exist" in proc.stderr

    proc = run_cpp(cmake_build.runner, model, model, outputs, cwd=tmp_path)  # not torch.save output
    assert proc.returncode == 1
    assert "cannot read inputs file" in proc.stderr

    proc = run_cpp(cmake_build.runner, model, inputs, outputs, "--ops-library", missing, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"ops library '{missing}' does not exist" in proc.stderr

    # Wrong input shape: the op's own argument check, reported, not a crash.
    torch.save([torch.randn(2, 5, 7)], inputs)
    proc = run_cpp(cmake_build.runner, model, inputs, outputs, cwd=tmp_path)
    assert proc.returncode == 1
    assert "forward failed" in proc.stderr and "pypeft.lora_linear" in proc.stderr

    for args in [(), (model, inputs), (model, inputs, outputs, "--bogus")]:
        proc = run_cpp(cmake_build.runner, *args, cwd=tmp_path)
        assert proc.returncode == 2
        assert "usage: pypeft_run" in proc.stderr
    assert not outputs.exists()


def test_installed_package(cmake_build, tmp_path):
    """cmake --install gives a runner that finds its library, and a package
    config with which a C++ program links pypeft::ops, keeping the library even
    under --as-needed."""
    cmake = shutil.which("cmake")
    prefix = tmp_path / "prefix"
    _run([cmake, "--install", cmake_build.dir, "--prefix", prefix])
    runner = prefix / "bin" / "pypeft_run"
    assert runner.exists() and (prefix / "include" / "pypeft" / "checks.h").exists()

    model, inputs, module, _, x = save_model("trace", tmp_path)
    outputs = tmp_path / "outputs.pt"
    proc = run_cpp(runner, model, inputs, outputs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        assert_close(torch.load(outputs), reference(module, x)[0])

    # A consumer that uses none of the library's symbols: without the
    # --no-as-needed that pypeft::ops carries, the linker would drop the library.
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "CMakeLists.txt").write_text(textwrap.dedent("""\
        cmake_minimum_required(VERSION 3.18)
        project(consumer LANGUAGES CXX)
        find_package(pypeft 0.1 REQUIRED)
        add_executable(consumer main.cpp)
        target_link_libraries(consumer PRIVATE ${TORCH_LIBRARIES} pypeft::ops ${CMAKE_DL_LIBS})
        """))
    (consumer / "main.cpp").write_text(textwrap.dedent(f"""\
        #include <dlfcn.h>
        // 0 when {LIB_NAME} came in with the program.
        int main() {{ return dlopen("{LIB_NAME}", RTLD_NOW | RTLD_NOLOAD) == nullptr; }}
        """))
    build = tmp_path / "consumer-build"
    _run([cmake, "-S", consumer, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={prefix};{torch.utils.cmake_prefix_path}",
          "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed"])
    _run([cmake, "--build", build])
    proc = subprocess.run([str(build / "consumer")], env=_cpp_env())
    assert proc.returncode == 0, f"{LIB_NAME} was not loaded with the consumer program"
