#!/usr/bin/env bash
# Rebuild the compiled extension in place after editing csrc/ (editable installs pick it up).
# Serialized with a lock so that parallel rebuilds in one checkout do not race.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/letter-build.lock python setup.py -q build_ext --inplace
