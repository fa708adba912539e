"""The same named intermediates from the upstream Hugging Face implementation (oracle extra).

Forward hooks on a transformers-native model (`AutoModelForCausalLM`, float32, CPU) map its
module inputs and outputs to slimllm's trace names: the first block's input is `embed`, each
attention module's input and output are `attn_in` / `attn_out`, the MLP's (or OPT's fc1/fc2)
are `mlp_in` / `mlp_out`, each decoder layer's output is `out`, then `final_norm` and `logits`.
q/k/v after positions live inside the attention forward and are not compared. Models that need
remote code (ChatGLM, Baichuan, Qwen v1) are refused with a clear error: their modeling files
are not part of transformers.
"""

from __future__ import annotations

import numpy as np

from slimllm.reference.errors import OptionError


def hf_trace(model, tokens) -> dict:
    try:  # optional: the oracle extra, never installed in CI
        import torch
        import transformers
    except ImportError as e:
        raise OptionError(
            f"--against hf needs torch and transformers (the oracle extra): {e}"
        ) from None
    hf_config = getattr(model, "hf_config", None) or {}
    if not model.source or hf_config.get("auto_map"):
        raise OptionError(
            "--against hf needs a Hugging Face checkpoint of a transformers-native "
            "model type (remote-code models such as ChatGLM, Baichuan, Qwen v1 are not)"
        )
    hf = transformers.AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32)
    hf.eval()
    inner = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model
    layers = inner.layers
    trace, hooks = {}, []

    def keep(name, value):
        value = value[0] if isinstance(value, tuple) else value
        value = value.detach().float().numpy()
        if value.ndim == 2:  # OPT flattens [b, t, e] to [b*t, e] around its MLP
            value = value.reshape(1, len(tokens), -1)
        trace[name] = value[0]

    def on_input(name):
        return lambda module, args, kwargs: keep(name, args[0] if args else kwargs["hidden_states"])

    def on_output(name):
        return lambda module, args, output: keep(name, output)

    hooks.append(layers[0].register_forward_pre_hook(on_input("embed"), with_kwargs=True))
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hooks.append(
            attn.register_forward_pre_hook(on_input(f"layers.{i}.attn_in"), with_kwargs=True)
        )
        hooks.append(attn.register_forward_hook(on_output(f"layers.{i}.attn_out")))
        first, last = (layer.mlp, layer.mlp) if hasattr(layer, "mlp") else (layer.fc1, layer.fc2)
        hooks.append(
            first.register_forward_pre_hook(on_input(f"layers.{i}.mlp_in"), with_kwargs=True)
        )
        hooks.append(last.register_forward_hook(on_output(f"layers.{i}.mlp_out")))
        hooks.append(layer.register_forward_hook(on_output(f"layers.{i}.out")))
    final = getattr(inner, "norm", None) or getattr(inner, "final_layer_norm", None)
    if final is not None:
        hooks.append(final.register_forward_hook(on_output("final_norm")))
    with torch.no_grad():
        out = hf(torch.tensor([list(tokens)]), use_cache=False)
    for h in hooks:
        h.remove()
    trace["logits"] = out.logits.float().numpy()[0]
    ordered = [k for k in trace if k == "embed"] + [k for k in trace if k.startswith("layers.")]
    return {
        k: np.asarray(trace[k])
        for k in ordered + [k for k in ("final_norm", "logits") if k in trace]
    }
