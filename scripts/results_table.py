"""Regenerate README.md's results table from the GPU runs committed under bench/results/.

    python scripts/results_table.py [--check]

The same as ``modekernels bench table``: rewrites only the lines between
``<!-- results:begin -->`` and ``<!-- results:end -->``; ``--check`` exits 1 when it is stale.
"""

import sys
from pathlib import Path

from modekernels.benchtool.table import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main(str(ROOT / "README.md"), str(ROOT / "bench" / "results"), "--check" in sys.argv[1:]))
