# Two commands do everything on a fresh machine:
#   make demo   - the main job on the embedded demo data (no downloads)
#   make test   - install everything and pass the whole test suite, notebooks included
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1) so pip takes the local build
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/upernet demo

test: $(STAMP)
	$(PY) -m pytest -q tests
	# notebooks/ and, recursively, notebooks/solutions/: the student notebooks (their unsolved
	# exercise cells, tagged raises-exception, raise NotImplementedError) and the solved ones
	# (every cell runs); conftest.py gives nbval
	# the sanitize file (notebooks/sanitize.cfg) by absolute path
	$(PY) -m pytest -q --nbval --nbval-current-env --nbval-cell-timeout=600 \
		-p no:cacheprovider notebooks/

clean-venv:
	rm -rf $(VENV)
