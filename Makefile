# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pin first: it takes the CPU wheel; a looser requirement could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,mpi,serve]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m gradsync train

# Everything; what CI runs. The 25 slowest tests close the log: where the suite's time goes.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25

# The edit-test loop: every package, without the tests marked slow (end-to-end runs of
# gradsync train/serve/bench, mpiexec, labs, the largest worlds); about 90 s on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_dataparallel.py
	$(PY) -m gradsync bench collectives
	$(PY) -m benchmarks.bench_check

clean:
	rm -rf $(VENV) *.egg-info
