"""`python -m slimllm.bench [kind] [options]` (or `python -m bench ...` from the repository root):
any benchmark, JSON on stdout (`--table` for a summary)."""

import sys

from .cli import main

sys.exit(main())
