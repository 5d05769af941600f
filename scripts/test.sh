#!/usr/bin/env bash
# Install everything, then run the whole test suite: lint, types, import rules, and every test (unit, contract,
# integration, interop with real peers, crash). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff";  .venv/bin/ruff check src tests bench
echo "== mypy";  .venv/bin/mypy
echo "== imports"; PYTHONPATH=src .venv/bin/lint-imports  # the rules in pyproject.toml; src/ of this checkout
echo "== pytest"
.venv/bin/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider "$@"
