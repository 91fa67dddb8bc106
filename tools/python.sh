# Sourced by the tools' scripts (from the repository root): sets PYTHON to $PYTHON if given, else to a venv in
# .venv-parity made once from tools/parity/requirements.txt (torch, diffusers, transformers).
if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv-parity/bin/python ]; then
    python3 -m venv .venv-parity
    .venv-parity/bin/pip install -q -r tools/parity/requirements.txt
  fi
  PYTHON=.venv-parity/bin/python
fi
