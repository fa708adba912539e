"""Conformance: what makes the NumPy reference and the JAX backend the same model (STYLE.md 13).

- `strategies`: Hypothesis strategies for configs (every feature combination, small discrete
  shapes), weights, prompts, runtime settings and attention inputs;
- `pairs`: every reference function with its JAX twin, how to draw inputs and compare outputs;
- `invariants`: checks either backend must pass (prefill == decode steps, slim == flash ==
  naive, int8 bounds, ragged rows == rows alone, seeded sampling across backends);
- `tolerances`: the one tolerance table;
- `profiles`: the Hypothesis settings profiles `ci` and `dev`.
"""
