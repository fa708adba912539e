"""`python bench/run.py [decode|attention|kv-decode|products|bandwidth|targets|realsize]
[options]`: any benchmark, JSON on stdout (`--table` for a summary). The same as `slimllm bench`
but JSON by default."""

import sys

from slimllm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
