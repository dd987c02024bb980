# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,diffusers]'
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/ditq demo --out out

test: $(STAMP)
	$(PY) -m ruff check ditq tests scripts bench
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(PY) -m ruff check ditq tests scripts bench

clean:
	rm -rf .venv out .pytest_cache
