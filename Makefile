# The two set-up commands of the README: `make demo` (install + main job on the demo data) and
# `make test` (install with dev extras + the whole test suite). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
WHISPER := openai-whisper==20250625

.PHONY: demo test lint bench mutate clean

$(VENV)/.runtime: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a CPU wheel where one is on local disk, the CUDA build on GPU nodes.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[speech-extra,whisper,image]"
	# openai-whisper's only extra dependency, triton, serves its CUDA kernels alone (1 GB): skip it.
	$(PIP) --no-deps $(WHISPER)
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) -e ".[speech-extra,whisper,image,dev]"
	touch $@

AUGPIPE := $(VENV)/bin/augpipe

demo: $(VENV)/.runtime
	$(AUGPIPE) demo-data demo
	$(AUGPIPE) run back-speech --input demo/text --output out/back-speech
	$(AUGPIPE) inspect out/back-speech
	$(AUGPIPE) run cmda --input demo/images --output out/cmda --set interpolate.pool_size=4
	$(AUGPIPE) evaluate --train demo/images --augmented out/cmda
	$(AUGPIPE) inspect out/cmda --html out/cmda.html
	$(AUGPIPE) run back-captioning --profile tiny --input demo/images --output out/back-captioning
	$(AUGPIPE) inspect out/back-captioning

test: $(VENV)/.dev
	$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$rc

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

# Mutation testing of the maths, filters and shard I/O ([tool.mutmut] in pyproject.toml): slow (tens of
# minutes on 2 cores), so not part of `make test`. `$(VENV)/bin/mutmut results` lists the survivors and
# `$(VENV)/bin/mutmut show NAME` shows one; triaged equivalent mutants are listed in tests/MUTANTS.md.
mutate: $(VENV)/.dev
	$(PIP) -e ".[speech-extra,whisper,image,dev,mutate]"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $${MUTATE_JOBS:-2}
	$(VENV)/bin/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json
	$(VENV)/bin/mutmut results

bench: $(VENV)/.dev
	$(PY) benchmarks/back_speech.py
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/cmda_weights.py

clean:
	rm -rf demo out
