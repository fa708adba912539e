"""`python -m bench.targets [options]`:
every measurement the benchmark issue sets a target for, judged in one run.

Options and JSON fields: bench/README.md (same as `slimllm bench targets`).
"""

import sys

from slimllm.bench import main

if __name__ == "__main__":
    sys.exit(main(["targets", *sys.argv[1:]]))
