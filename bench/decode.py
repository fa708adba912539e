"""`python -m bench.decode [options]`:
xFT-style decode latency: first token, next token mean/p90, throughput, floor.

Options and JSON fields: bench/README.md (same as `slimllm bench decode`).
"""

import sys

from slimllm.bench import main

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
