"""``python -m conclab.analysis [RUN ...] [options]``: the same as ``conclab report``."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
