import sys

from modekernels.cli import main

sys.exit(main())
