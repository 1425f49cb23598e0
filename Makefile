# Two commands matter (see README): `make demo` and `make test`. CI (.ci/run) runs `make lint` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-cpu test-gpu lint format clean-venv

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

# the CPU suite, then the GPU suite on the Vulkan build (lavapipe where there is no GPU)
test: test-cpu test-gpu

# the residency suite once more with the page tier limited to macOS's operations (residency.platform)
RESIDENCY_SUITE := tests/test_engine.py tests/test_gate.py tests/test_memory_plan.py tests/test_slots.py \
	tests/test_slot_filler.py tests/test_threads.py

test-cpu: setup
	$(PY) -m pytest -q
	MOESPAC_PLATFORM=macos $(PY) -m pytest -q $(RESIDENCY_SUITE)

test-gpu:
	bash scripts/test_gpu.sh

lint: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean-venv:
	rm -rf .venv .venv-vulkan
