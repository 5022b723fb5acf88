"""Build ``metake_fast`` and its C++/CUDA extension ``metake_fast._C``.

Environment switches
    METAKE_FAST_NO_EXTENSION=1   pure-Python install (every op uses the PyTorch reference)
    METAKE_FAST_NO_CUDA=1        build only the CPU sources even when torch has CUDA and nvcc exists
    METAKE_FAST_CUDA_ARCHS="90"  CUDA architectures (default: 80;90)
    MAX_JOBS=N                   parallel compile jobs (torch.utils.cpp_extension)

Nothing is downloaded: the build uses the torch already installed (install with
``pip install --no-build-isolation``).
"""

import glob
import os
import shutil

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def extensions():
    if _flag("METAKE_FAST_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = (
        not _flag("METAKE_FAST_NO_CUDA")
        and torch.version.cuda is not None
        and cuda_sources
        and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))
    )
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-march=x86-64-v2" if os.uname().machine == "x86_64" else "-O3"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    include_dirs = [os.path.join(here, "csrc")]
    if with_cuda:
        archs = os.environ.get("METAKE_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        nvcc = ["-O3", "--use_fast_math", "-std=c++17"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        ext = CUDAExtension(
            "metake_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("METAKE_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "metake_fast._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=["metake_fast", "metake_fast.ops", "metake_fast.kernels"],
    package_dir={"metake_fast.kernels": "kernels"},
    package_data={"metake_fast": ["data/*", "hparams/*/*.yaml"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
