"""Loads the compiled drafter cores (drafters/_native, built from drafters/csrc by `pip install`).

Why C++ behind pybind11 rather than numba or vectorised numpy: the hot path is a handful of small scans, two hash
chain walks, a trie of a few hundred nodes and a heap per sequence per step: work whose cost in Python or numpy is
the interpreter and the per-call overhead, not the arithmetic (~270 µs per sequence-step before, against the ~6-14
µs of ArcticInference's C++ cache, which vLLM's `suffix` method uses). Numba would need typed containers for the
hash maps and trie, compiles on first use in every Ray worker, and adds llvmlite to the install; a C++17 extension
is built once by pip with the compiler and Python headers a fresh machine has (pybind11 comes from PyPI as a build
requirement), holds its state in flat arrays, and is called once per step for the whole batch.

A missing or broken build is an error that says how to build it: there is no silent fallback to the Python
reference (drafters/suffix_reference.py), which is ~50x slower and exists for the tests to hold the core to.
"""

from __future__ import annotations

from types import ModuleType

_HOW_TO_BUILD = (
    "the compiled drafter core drafters/_native is not built or cannot load ({cause}); build it with "
    "`pip install -e .` from the project folder (needs a C++17 compiler such as g++, and the Python headers: "
    "python3-dev on Debian/Ubuntu)"
)


def load_native() -> ModuleType:
    try:
        from drafters import _native
    except ImportError as exc:
        raise ImportError(_HOW_TO_BUILD.format(cause=exc)) from exc
    return _native
