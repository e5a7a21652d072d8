# make demo / make test work on a fresh clone: `setup` creates .venv when it is missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m activemoe.demo

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf .venv build *.egg-info
