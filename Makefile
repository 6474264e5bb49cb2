# Two commands for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test benchmark clean

# (Re)install when the package metadata changes; an existing .venv is reused.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Until the Ray runner lands: one digits trial each of SGD, edge-popup and IteRand, on CPU
# (about 20 s). K_per is scaled to digits' 20 iterations an epoch so that IteRand re-draws.
QS := --set dataset=digits --set model=conv6x0.25 --set epochs=6 --set batch_size=64 \
      --set train_augmentation=false --set weight_decay=1e-4
quickstart: install
	$(PY) -m iterand_tune train --method sgd       $(QS) --set lr=0.01
	$(PY) -m iterand_tune train --method edgepopup $(QS) --set lr=0.3
	$(PY) -m iterand_tune train --method iterand   $(QS) --set lr=0.3 --set rerand_freq=10

test: install
	$(PY) -m pytest

benchmark: install
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
