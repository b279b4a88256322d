#!/usr/bin/env bash
# Set up (see setup.sh) and run the quick lab; it ends by printing the report's path.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
exec conclab demo "$@"
