"""``python -m servers BACKEND [options]``: the same as ``conclab serve``."""
import sys

from .cli import main

sys.exit(main(["serve", *sys.argv[1:]], prog="python -m servers"))
