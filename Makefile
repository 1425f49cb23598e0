# Two commands matter (see README): `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test bench clean-venv

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf .venv
