"""Builds pypeft._C, the native ops, with torch.utils.cpp_extension.

    pip install torch==2.13.0 ninja          # torch first: the ops compile against it
    pip install --no-build-isolation .

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build
and a CUDA toolkit (nvcc) is present and either a GPU is visible or
FORCE_CUDA=1 asks for a compile without one. The same csrc/ also builds with
CMake (CMakeLists.txt) for C++ users.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import torch
except ImportError:
    sys.exit(
        "pypeft: building the native ops needs PyTorch installed first, in this environment:\n"
        "    pip install torch==2.13.0 ninja setuptools wheel\n"
        "then build without pip's isolated environment (which would fetch another torch):\n"
        "    pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
FORCE_CUDA = os.environ.get("FORCE_CUDA", "") == "1"


def real_cuda_home():
    """The toolkit root behind the `nvcc` on PATH.

    On some machines `nvcc` is a small wrapper script elsewhere; torch derives
    CUDA_HOME from the wrapper's location and then cannot find libcudart. nvcc's
    dry run prints the real root (its TOP= line).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        # A dry run compiles nothing; the probe lives in a temporary directory
        # so that the source tree stays untouched.
        with tempfile.TemporaryDirectory(prefix="pypeft-nvcc-") as tmp:
            probe = os.path.join(tmp, "probe.cu")
            with open(probe, "w") as f:
                f.write("\n")
            out = subprocess.run([nvcc, "-dryrun", "-c", probe, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
        if match:
            return os.path.realpath(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def want_cuda():
    if torch.version.cuda is None:
        if FORCE_CUDA:
            sys.exit(f"pypeft: FORCE_CUDA=1, but torch {torch.__version__} is a CPU build; "
                     "install a CUDA build of torch to compile the CUDA kernels")
        return False
    if not (torch.cuda.is_available() or FORCE_CUDA):
        return False
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        home = real_cuda_home()
        if home is None:
            if FORCE_CUDA:
                sys.exit("pypeft: FORCE_CUDA=1, but no nvcc is on PATH and CUDA_HOME is not set")
            return False
        os.environ["CUDA_HOME"] = home
        # cpp_extension reads CUDA_HOME once, when it is first imported; if
        # something imported it already, correct its copy too.
        cpp_extension = sys.modules.get("torch.utils.cpp_extension")
        if cpp_extension is not None:
            cpp_extension.CUDA_HOME = home
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch's arch detection fails with no visible GPU: name Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return True


def wheel_cuda_include_flags():
    """Headers such as cublas_v2.h that a runtime-only toolkit lacks but the
    nvidia-* wheels beside a CUDA torch carry (site-packages/nvidia/*/include).

    Passed as -isystem, which is searched after every -I directory: the
    toolkit's own headers (cuda_runtime.h, crt/, which must match its nvcc)
    win, and the wheel's directory only fills in what the toolkit lacks.
    """
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.exists(os.path.join(d, "cublas_v2.h")))
    return [flag for d in dirs for flag in ("-isystem", d)]


# at::parallel_for is a header template: without OpenMP where our kernels are
# compiled it runs every loop on one thread (it did, before this was added).
# On Linux torch's wheels bring libgomp.so.1, which the loader reuses for us
# (same soname), so the kernels share torch's thread pool.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def extension():
    with_cuda = want_cuda()
    # cpp_extension reads CUDA_HOME when it is imported: import it only now.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx_flags = ["-O3", "-fvisibility=hidden"] + OPENMP_FLAGS
    if not with_cuda:
        return CppExtension("pypeft._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=OPENMP_FLAGS)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    wheel_includes = wheel_cuda_include_flags()
    return CUDAExtension(
        "pypeft._C", sources,
        include_dirs=include_dirs,
        define_macros=[("PYPEFT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + wheel_includes,
                            "nvcc": ["-O3", "--expt-relaxed-constexpr"] + wheel_includes},
        extra_link_args=OPENMP_FLAGS,
    )


if __name__ == "__main__":
    from setuptools import setup

    ext = extension()  # before importing cpp_extension: it may set CUDA_HOME
    from torch.utils.cpp_extension import BuildExtension

    kernels = "CPU and CUDA" if any(s.endswith(".cu") for s in ext.sources) else "CPU"
    print(f"pypeft: building {ext.name} with {kernels} kernels")
    # Plain BuildExtension: it uses ninja when ninja is there and falls back by
    # itself. Not BuildExtension.with_options(use_ninja=...): its keyword reaches
    # distutils' Command.__init__, which older setuptools (77.0.3, the floor in
    # pyproject.toml) reject while pip generates metadata.
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension},
    )
