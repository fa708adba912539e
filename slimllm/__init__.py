"""slimllm: exact, fast, teachable LLM inference on CPUs.

    import slimllm
    model = slimllm.load("path/to/checkpoint")        # HF directory or llama2.c .bin
    model = slimllm.load(slimllm.SHIPPED_MODEL)       # or the small Llama slimllm ships
    out = slimllm.generate(model, "Once upon a time", max_new_tokens=32)
    print(out.text)

Compiled programs are kept in ~/.cache/slimllm/xla for the next process (`compile_cache`).
"""

import os as _os

# From the root of a source checkout this folder is found before an installed slimllm, and its
# subpackages are the sibling folders (pyproject's package-dir: reference/, jaxbackend/, ...):
# the checkout's root joins the search path so `slimllm.reference` is that checkout's.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "reference")) and _os.path.isfile(
    _os.path.join(_root, "reference", "__init__.py")
):
    __path__.append(_root)

from .api import (  # noqa: E402 (after the path)
    SHIPPED_MODEL,
    Model,
    Output,
    Runtime,
    compile_cache,
    demo_model,
    generate,
    load,
)
from .reference.errors import SlimllmError  # noqa: E402

__all__ = [
    "Model",
    "Output",
    "Runtime",
    "SHIPPED_MODEL",
    "SlimllmError",
    "compile_cache",
    "demo_model",
    "generate",
    "load",
]
