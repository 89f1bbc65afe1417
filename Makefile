# dimkit: two commands do all the set-up.
#   make demo   create .venv if missing, install the kit, run every numbered notebook on the sample
#   make test   create .venv if missing and run the test suite (what CI runs)
#   make test-fast  the suite without the slow tier (notebook runs, multi-process, packaging): the inner loop
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= sample
RUNS ?= runs
STAMP := $(VENV)/.dimkit-installed

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-fast sync-notebooks bench clean lab reproduce reproduce-check sample sample-clip rehearsal

venv: $(STAMP)

# torch/torchvision are pinned exactly in pyproject.toml; see README "Environment".
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	TQDM_DISABLE=1 $(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	TQDM_DISABLE=1 $(PY) -m pytest -q -m "not slow" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m dimkit.cli notebooks --dataset $(DATASET) --out $(RUNS)/notebooks

# The whole chain on released data (prepare, augment or replay, cues, features, train, tables, figure):
#   make reproduce DATASETS="wiki+ rich+" [VARIANTS=paper,released] [ABLATIONS=none,no_cue,...]
# It first checks every input and names what is missing. Real weights need the Hugging Face cache
# filled, or HF_HUB_OFFLINE=0 on first use, or local files via REPRODUCE_ARGS="--clip FILE ...".
DATASETS ?= sample+
VARIANTS ?= paper
ABLATIONS ?= none
REPRODUCE_ARGS ?=

reproduce-check: $(STAMP)
	$(PY) -m dimkit.cli reproduce --check $(DATASETS) --variants $(VARIANTS) --ablations $(ABLATIONS) $(REPRODUCE_ARGS)

reproduce: $(STAMP)
	$(PY) -m dimkit.cli reproduce $(DATASETS) --variants $(VARIANTS) --ablations $(ABLATIONS) $(REPRODUCE_ARGS)

# Re-pair after editing a notebook's .py (or .ipynb) so the two never drift.
sync-notebooks: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

# Regenerate the bundled synthetic sample and the small CLIP trained on it (both deterministic).
sample: $(STAMP)
	$(PY) -m dimkit_dev.sample

sample-clip: $(STAMP)
	$(PY) -m dimkit_dev.clip_train

# The whole chain on synthetic data shaped like a real dataset, at 1/16, 1/4 and full size: time, peak
# memory, items/s and bytes per stage, growth exponents, the rerun, DIM's fuzzywuzzy loop beside the
# candidates (see benchmarks/rehearsal.py). The three scales and --kill take about 30 minutes on 2 cores.
#   make rehearsal LIKE=wikimel [SCALES=0.0625,0.25,1] [REHEARSAL_ARGS="--kill"]
LIKE ?= wikimel
SCALES ?= 0.0625,0.25,1
REHEARSAL_ARGS ?=
rehearsal: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/rehearsal.py --like $(LIKE) --scales $(SCALES) $(REHEARSAL_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

lab: $(STAMP)
	$(PY) -m pip install --quiet -e '.[lab]'
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(RUNS) .cache .pytest_cache
