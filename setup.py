"""Build of the distfuse extension.

CUDA sources (csrc/**/*.cu and the CUDA glue) are compiled when torch is a CUDA
build and a CUDA toolkit is found; otherwise a CPU-only library is built whose
CUDA dispatch runs the reference (NCCL) paths. DISTFUSE_CPU_ONLY=1 forces the
CPU-only library. The library registers its ops with TORCH_LIBRARY and has no
Python module, so one build loads on every Python version (loaded by
distfuse/__init__.py with torch.ops.load_library).
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cutlass_include_dirs():
    """CUTLASS/CuTe headers from the nvidia-cutlass wheel (never vendored)."""
    try:
        import cutlass_library
    except ImportError as e:
        raise RuntimeError(
            "building the CUDA kernels needs the CUTLASS headers: pip install nvidia-cutlass==4.2.0.0 "
            "(or set DISTFUSE_CPU_ONLY=1)") from e
    base = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    dirs = [os.path.join(base, "include"), os.path.join(base, "tools", "util", "include")]
    for d in dirs:
        if not os.path.isdir(d):
            raise RuntimeError(f"CUTLASS headers not found at {d}")
    return dirs


def want_cuda():
    if os.environ.get("DISTFUSE_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def arch_flags():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a").replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip() for a in archs)):
        num = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def extension():
    with_cuda = want_cuda()
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp"))
    cuda_only_cpp = sorted(glob.glob("csrc/comm/*.cpp") + glob.glob("csrc/ops/cuda/*.cpp"))
    # DISTFUSE_KERNELS=allreduce,... builds only those kernel families (faster
    # iteration); ops whose kernels are left out run their reference path.
    families = os.environ.get("DISTFUSE_KERNELS", "")
    cu_sources = sorted(f for f in glob.glob("csrc/**/*.cu", recursive=True)
                        if "/tests/" not in f)
    if families:
        keep = set(families.split(",")) | {"common"}
        cu_sources = [f for f in cu_sources
                      if not f.startswith("csrc/kernels/") or f.split("/")[2] in keep]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-std=c++17"]
    opt = os.environ.get("DISTFUSE_NVCC_THREADS", "2")
    if with_cuda:
        include_dirs += cutlass_include_dirs()
        defines = ["-DDISTFUSE_WITH_CUDA"]
        if families and "gemm" not in families.split(","):
            defines.append("-DDISTFUSE_NO_GEMM")
        cxx += defines
        # No --use_fast_math: it flushes fp32 denormals, which bf16 inputs can hold.
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                f"--threads={opt}", "-DNDEBUG"] + defines
        if os.environ.get("DISTFUSE_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        nvcc += arch_flags()
        return cpp_extension.CUDAExtension(
            "distfuse._C",
            cpp_sources + cuda_only_cpp + cu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "distfuse._C", cpp_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, py_limited_api=True)


setup(
    name="distfuse",
    version="0.1.0",
    packages=find_packages(include=["distfuse", "distfuse.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
