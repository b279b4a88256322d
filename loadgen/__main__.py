"""``python -m conclab.loadgen [options]``: the same as ``conclab load [options]``."""
import sys

from .cli import main

if __name__ == "__main__":      # guarded: spawned load processes import this module too
    sys.exit(main())
