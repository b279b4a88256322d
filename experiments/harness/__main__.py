"""``python -m conclab.experiments.harness EXPERIMENT [options]``: the same as ``conclab run``."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
