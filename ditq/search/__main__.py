"""`python -m ditq.search ...` (the same as `ditq search ...`)."""

import sys

from ditq.search.cli import main

raise SystemExit(main(sys.argv[1:]))
