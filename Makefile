# Two commands for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test test-kernels test-resume benchmark clean

# (Re)install when the package metadata changes; an existing .venv is reused.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# A miniature figure 2 on digits as one Ray Tune run on this machine's CPUs: SGD, edge-popup
# and IteRand on Conv6 x0.25 / x0.5, two seeds, 12 trials; --report ends it
# with the run's report.html.
quickstart: install
	$(PY) -m iterand_tune experiments/quickstart.py --report

# Two pytest-xdist workers, so that both cores stay busy: the tests that share the session's Ray
# instance run in one, the rest in the other (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not resume_loop"

# Every kind of run (grid, search) with one and two trials at a time, its driver killed or
# stopped with Ctrl-C at four moments, then resumed, locally and on an S3 server
# (tests/test_resume_loops.py; pytest prints the time each set took). REPEAT=20 runs the
# whole set that many times in a row.
REPEAT ?= 1
test-resume: install
	for i in $$(seq $(REPEAT)); do $(PY) -m pytest -n 0 -m resume_loop -x -q || exit 1; done

# The tests that assert learning, again under ATen's portable and AVX2 CPU kernels: a CPU's vector
# unit changes the numerics of a short training run, so a margin that holds on one CPU is checked
# on the others here, not on a user's machine. CI runs it after `make test`.
test-kernels: install
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -m learning -q
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -m learning -q

benchmark: install
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# On a GPU machine, from the checkout as it is: no venv, no install, no Ray (docs/gpu.md).
# CUDA tests, throughput, packing and a short figure-2-like run in at most 8 minutes; the
# results land in gpu-check/report.md and gpu-check/report.json. Exits 3 without a GPU.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py --out gpu-check
