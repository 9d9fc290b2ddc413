"""The compiled drafter cores (drafters/csrc -> drafters._native), built by pip with the system C++ compiler.

Everything else about the package is declared in pyproject.toml; setuptools needs this file only for the extension.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "drafters._native",
            ["drafters/csrc/module.cpp"],
            depends=[f"drafters/csrc/{name}.h" for name in ("half", "ngram_core", "slots", "suffix_core")],
            cxx_std=17,
            # -O3, and no -ffast-math: the core must round as the Python reference does, bit for bit.
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
