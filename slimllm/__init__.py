"""slimllm: exact, fast, teachable LLM inference on CPUs.

import slimllm
model = slimllm.load("path/to/checkpoint")        # HF directory or llama2.c .bin
out = slimllm.generate(model, "Once upon a time", max_new_tokens=32)
print(out.text)
"""

from .api import Model, Output, demo_model, generate, load

__all__ = ["Model", "Output", "demo_model", "generate", "load"]
