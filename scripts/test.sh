#!/usr/bin/env bash
# The test suite, on a fresh machine too: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m pytest -q tests "$@"
