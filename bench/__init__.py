"""Runnable benchmark scripts (JSON on stdout; `--table` for a summary). The implementation is
`slimllm.bench`, so `slimllm bench ...` runs the same code from anywhere; see README.md here."""
