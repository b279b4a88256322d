"""``python -m conclab COMMAND ...``: the same as the ``conclab`` command."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
