"""`python -m bench.kv_decode [options]`:
one decode step at context 4096, batch 4, per KV cache dtype (float32 vs int8).

Options and JSON fields: bench/README.md (same as `slimllm bench kv-decode`).
"""

import sys

from slimllm.bench import main

if __name__ == "__main__":
    sys.exit(main(["kv-decode", *sys.argv[1:]]))
