"""``python -m conclab.servers BACKEND [options]``: the same as ``conclab serve``."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
