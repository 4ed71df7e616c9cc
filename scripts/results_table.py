"""Regenerate README.md's results table from the GPU runs committed under bench/results/.

    python scripts/results_table.py [--check]

The same as ``modekernels bench table`` on this checkout: rewrites only the lines between
``<!-- results:begin -->`` and ``<!-- results:end -->``; ``--check`` exits 1 when it is stale,
and an unusable README exits 2.
"""

import sys
from pathlib import Path

from modekernels.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    check = ["--check"] if "--check" in sys.argv[1:] else []
    sys.exit(main(["bench", "table", "--readme", str(ROOT / "README.md"),
                   "--results", str(ROOT / "bench" / "results"), *check]))
