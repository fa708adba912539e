"""Benchmarks with JSON output, installed as `slimllm.bench` (pyproject's package-dir): one
module per benchmark (decode, attention, kv_decode, products, bandwidth, targets, realsize), what
they share in common.py, and the entry point of `slimllm bench` in cli.py. See README.md here."""
