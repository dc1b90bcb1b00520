#!/usr/bin/env bash
# Builds the documentation site strictly (any warning fails: a broken link, a
# missing page, an API reference that does not resolve, a benchmark table whose
# JSON is missing). Installs the `docs` extra's packages into the environment
# that scripts/setup_env.sh made ($MSDA_VENV, default .venv), so run that first.
# The site lands in site/ (mkdocs serve shows it live).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${MSDA_VENV:-$ROOT/.venv}"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# The docs extra's pins, read from pyproject.toml so they are written once.
mapfile -t DOCS_DEPS < <(python - <<'PY'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))
PY
)
python -m pip install -q --disable-pip-version-check "${DOCS_DEPS[@]}"
export NO_MKDOCS_2_WARNING=1  # material's notice about its successor, printed on every build
start=$(date +%s)
python -m mkdocs build --strict --site-dir "$ROOT/site"
echo "docs: built in $(( $(date +%s) - start )) s"
