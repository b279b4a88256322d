#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite; extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
exec python -m pytest "$@"
