"""Builds lora_ops._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and
nvcc is found (also on machines without a GPU, so CI proves the CUDA sources compile)."""
import glob
import importlib.util
import os
import re
import shutil
import subprocess


def nvcc_toolkit_root() -> str | None:
    """The toolkit directory of the nvcc on PATH, as nvcc itself reports it (its dry run prints TOP).

    torch takes the parent of nvcc's directory instead, which is wrong when that nvcc is a wrapper
    script outside the toolkit: with these machines' /usr/local/bin/nvcc it would look for the CUDA
    headers in /usr/local/include and the build would fail unless the toolkit's bin/ led PATH."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull],
                                 capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    root = os.path.realpath(top.group(1).strip()) if top else None
    return root if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) else None


# Must precede the cpp_extension import, which fixes its CUDA_HOME when first imported.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    toolkit = nvcc_toolkit_root()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def visible_gpu_archs() -> str:
    """TORCH_CUDA_ARCH_LIST for the GPUs this machine has ("" without one): each card's compute
    capability, sm_90 as 9.0a."""
    if not torch.cuda.is_available():
        return ""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")
                    for major, minor in caps)


def want_cuda() -> bool:
    if os.environ.get("LORA_OPS_NO_CUDA", "0") == "1":
        return False
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc or shutil.which("nvcc"))


def cublas_dirs():
    """(include, lib) holding cuBLAS: the pip nvidia packages torch ships with, else CUDA_HOME."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    for sub in ("nvidia/cu13", "nvidia/cublas", "nvidia/cu12"):
        inc, lib = os.path.join(site, sub, "include"), os.path.join(site, sub, "lib")
        if os.path.exists(os.path.join(inc, "cublas_v2.h")) and glob.glob(os.path.join(lib, "libcublas.so*")):
            return inc, lib
    return os.path.join(CUDA_HOME, "include"), os.path.join(CUDA_HOME, "lib64")


def cublas_link_name(lib_dir: str) -> str:
    if os.path.exists(os.path.join(lib_dir, "libcublas.so")):
        return "cublas"
    versioned = sorted(glob.glob(os.path.join(lib_dir, "libcublas.so.*")))
    return ":" + os.path.basename(versioned[0]) if versioned else "cublas"


def cutlass_include_dir() -> str | None:
    """CUTLASS's headers, for the Hopper adapter-in-GEMM kernel (csrc/cuda/adapter_gemm_sm90*):
    $LORA_OPS_CUTLASS_DIR, else those the nvidia-cutlass package ships. None: that kernel is
    built as a stub and the forward keeps its other plans."""
    candidates = [os.environ.get("LORA_OPS_CUTLASS_DIR", "")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "source", "include"))
    return next((c for c in candidates if c and os.path.exists(os.path.join(c, "cutlass", "cutlass.h"))), None)


def extension():
    # The C ABI (csrc/c_api.cpp) belongs to the standalone CMake library, not the torch module.
    sources = sorted(s for s in glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
                     if not s.endswith("c_api.cpp"))
    # cpp_extension picks the C++ standard torch needs. The CPU kernels are ~2.3x faster with the
    # build machine's vector units (AVX2/AVX-512, FMA): LORA_OPS_CPU_ARCH=x86-64-v3 (or empty for
    # the compiler's default) builds for other machines.
    arch = os.environ.get("LORA_OPS_CPU_ARCH", "native")
    # -fno-wrapv undoes the -fwrapv that cpp_extension copies from Python's own CFLAGS: with
    # signed overflow defined to wrap, GCC keeps the kernels' int64 index arithmetic exact and
    # vectorises the packing and epilogue loops worse (fp32 forward at M=256, K=4096, N=1024:
    # ~15% slower, measured). The kernels never rely on signed wrap-around.
    cxx = ["-O3", "-fno-wrapv", "-fopenmp"] + ([f"-march={arch}"] if arch else [])
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return CppExtension("lora_ops._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    # Without a GPU cpp_extension cannot guess the architectures (it fails outright); with one it
    # would build plain sm_90 for a Hopper card, where the adapter-in-GEMM kernel (wgmma, TMA)
    # needs sm_90a's features: the visible cards' own architectures, 9.0 as 9.0a.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", visible_gpu_archs() or DEFAULT_CUDA_ARCHS)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    inc, lib = cublas_dirs()
    cutlass = cutlass_include_dir()
    defines = ["-DLORA_OPS_WITH_CUDA", f'-DLORA_OPS_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DLORA_OPS_WITH_CUDA"]
    return CUDAExtension(
        "lora_ops._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + [inc] + ([cutlass] if cutlass else []), library_dirs=[lib],
        libraries=[cublas_link_name(lib)],
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
        extra_link_args=["-fopenmp", f"-Wl,-rpath,{lib}"])


setup(
    packages=find_packages(include=["lora_ops", "lora_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
