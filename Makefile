# The two commands a new machine needs:  `make demo` (main job) and `make test` (the suite).
# Both run `make setup` first, which is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup test demo clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: pyproject.toml scripts/setup.sh $(wildcard requirements/lock-*.txt)
	./scripts/setup.sh
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m dynamo_dwdp.demo

clean:
	rm -rf $(VENV) models runs out .pytest_cache

.PHONY: k8s
k8s: setup   ## regenerate k8s/ from graphs/ + configs/ (a test fails when it is stale)
	$(PY) -m dynamo_dwdp.cli k8s render-all
