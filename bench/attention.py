"""`python -m bench.attention [options]`:
one attention layer's prefill (default 1024 tokens, d=128): naive, slim, flash.

Options and JSON fields: bench/README.md (same as `slimllm bench attention`).
"""

import sys

from slimllm.bench import main

if __name__ == "__main__":
    sys.exit(main(["attention", *sys.argv[1:]]))
