# Sourced by bench/*.sh after `cd` to the checkout: PY is the interpreter their Python
# steps run with -- $PYTHON if set, else the checkout's environment (.venv, made by
# scripts/install-test-deps), else python3 from PATH (which may lack the dependencies).
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
