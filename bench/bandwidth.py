"""`python -m bench.bandwidth [options]`:
the machine's memory bandwidth (NumPy copy and a jitted XLA reduction).

Options and JSON fields: bench/README.md (same as `slimllm bench bandwidth`).
"""

import sys

from slimllm.bench import main

if __name__ == "__main__":
    sys.exit(main(["bandwidth", *sys.argv[1:]]))
