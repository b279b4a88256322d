"""``python -m analysis report|demo ...``: the same as ``conclab report`` and ``conclab demo``."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
