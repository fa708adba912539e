"""The compiled kernels (kernels/src/*.cc -> slimllm.kernels._native); everything else about the
package is in pyproject.toml.

The extension is optional: when it cannot be built (no C++ compiler, no XLA FFI headers), the
install goes on without it and slimllm runs its pure-XLA path (`slimllm.kernels.available()`).
The XLA FFI headers come from jaxlib, a build requirement (pyproject's [build-system]).
"""

import glob
import os

from setuptools import Extension, setup


def ffi_include() -> list[str]:
    try:
        import jaxlib
    except ImportError:
        return []
    return [os.path.join(os.path.dirname(jaxlib.__file__), "include")]


def flags(*names):
    return [f for f in names if f]


# -isystem: the XLA headers' own warnings are not ours
includes = ffi_include()
native = Extension(
    "slimllm.kernels._native",
    sources=sorted(glob.glob("kernels/src/*.cc")),
    depends=sorted(glob.glob("kernels/src/*.h")),
    include_dirs=["kernels/src"],
    extra_compile_args=flags("-std=c++17", "-O3", *(f"-isystem{d}" for d in includes)),
    language="c++",
    optional=True,
)

setup(ext_modules=[native])
