# Two commands do all set-up on a fresh machine with GNU make, bash and Python 3 (README.md):
#   make demo   -> installs (.venv, CPU or CUDA build picked automatically) and runs the main job
#   make test   -> installs and runs the whole test suite
VENV ?= .venv
PYTHON ?= python3
# quoted, as VENV below, DATA_DIR and RUNS_DIR: a path with spaces stays one word in the shell
PY := "$(VENV)/bin/python"
DATA_DIR ?= data
RUNS_DIR ?= runs

.PHONY: install demo test bench clean

install:
	PYTHON="$(PYTHON)" VENV="$(VENV)" bash scripts/install.sh

demo: install
	$(PY) -m recsys_llm.cli demo --data-dir "$(DATA_DIR)/synthetic" --run-dir "$(RUNS_DIR)/demo"

test: install
	@$(PY) -m pytest -q tests; code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no test (exit 5): a failure" >&2; fi; exit $$code

bench: install
	-bash scripts/peer_venv.sh  # the DeepCTR-Torch venv of benchmarks/peers.py; peers.py says so if it is missing
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf "$(RUNS_DIR)" benchmarks/results/*.tmp .pytest_cache
