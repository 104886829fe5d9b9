# Two commands do everything on a fresh machine:
#   make demo   - the main job on the embedded demo data (no downloads)
#   make test   - install everything and pass the whole test suite, notebooks included
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pyproject.toml gives ranges; constraints.txt pins torch/torchvision (2.14.1 / 0.29.1) so pip
	# takes the local build; [dev] pulls every extra ([hf], [tb], [export], [prepare])
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/upernet demo

test: $(STAMP)
	# the unit tests, then the end-to-end checks marked slow (real torch.compile and int8
	# quantization, the full-size notebooks 01-03, the GPU script's dry run, a wheel install):
	# together every test in tests/ (tests/test_suite_split.py checks the two steps)
	$(PY) -m pytest -q -m "not slow" tests
	$(PY) -m pytest -q -m slow tests
	# notebooks/ and, recursively, notebooks/solutions/: the student notebooks (their unsolved
	# exercise cells, tagged raises-exception, raise NotImplementedError) and the solved ones
	# (every cell runs); conftest.py gives nbval
	# the sanitize file (notebooks/sanitize.cfg) by absolute path
	$(PY) -m pytest -q --nbval --nbval-current-env --nbval-cell-timeout=600 \
		-p no:cacheprovider notebooks/

clean-venv:
	rm -rf $(VENV)

# The course, to work on: copies the student notebooks into course-work/ (git-ignored), so that
# what you write and run never changes the tracked notebooks/. Then, with jupytext's notebook
# view as the default for .py files (notebooks/jupyter-config):
#   JUPYTER_CONFIG_PATH=notebooks/jupyter-config .venv/bin/jupyter lab course-work/
# It never overwrites a notebook already in course-work/ (your work): delete it to start over.
COURSE_WORK ?= course-work

.PHONY: course
course:
	mkdir -p $(COURSE_WORK)
	for nb in notebooks/[0-9][0-9]_*.ipynb; do \
		test -e $(COURSE_WORK)/$$(basename $$nb) || cp $$nb $(COURSE_WORK)/; done
	@echo "student notebooks in $(COURSE_WORK)/; open them with:"
	@echo "  JUPYTER_CONFIG_PATH=notebooks/jupyter-config $(VENV)/bin/jupyter lab $(COURSE_WORK)/"
