# Two commands matter (see README): `make demo` and `make test`. CI (.ci/run) runs `make lint` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint format clean-venv

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean-venv:
	rm -rf .venv
