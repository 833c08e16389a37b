# ptune: two commands take a fresh clone to a registered adapter (`make run`) and to a
# green test suite (`make test`). Everything runs offline on CPU; CUDA is used if present.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed

# No telemetry, no hub look-ups: Prefect's first flow otherwise waits on analytics,
# and DVC starts an analytics daemon.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# transformers 5.25 on CUDA otherwise fetches a rotary kernel from the hub at the first forward pass
export USE_HUB_KERNELS := NO
export TOKENIZERS_PARALLELISM := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PATH := $(BIN):$(PATH)

.PHONY: run test test-fast env repro register docs clean-env server worker deploy serve

env: $(STAMP)

# torch first, from the CPU wheel: a plain `torch` requirement resolves to multi-GB CUDA builds.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(STAMP)
	dvc repro
	ptune register
	@echo
	@echo "adapter:   data/models/adapter/   (PEFT weights, tokenizer, model card README.md, ptune_adapter.json)"
	@echo "metrics:   data/eval/report.md    (tuned vs the zero- and few-shot prompts; metrics.json, gate.json beside it)"
	@echo "registry:  ptune registry         (GTO tags; data pushed to the DVC remote dvc-remote/)"
	@echo "serve:     make serve             (its prod version over an OpenAI-compatible API, http://127.0.0.1:8000/v1)"

repro: $(STAMP)
	dvc repro

register: $(STAMP)
	ptune register

# Great Expectations Data Docs: each stage's validation adds its page as it runs; this
# rebuilds the site from the stored results and prints the index page (it works offline).
docs: $(STAMP)
	ptune docs

test: $(STAMP)
	pytest

# The inner loop: unit tests only, no `dvc repro`, flow run, server or browser.
test-fast: $(STAMP)
	pytest -m "not slow"

# Prefect (README, "Prefect"): `make server` in one terminal, `make worker` in another,
# then `make deploy`; the UI is at http://127.0.0.1:4200. Ctrl-C stops server and worker.
server: $(STAMP)
	ptune server

worker: $(STAMP)
	ptune worker

deploy: $(STAMP)
	ptune deploy

# The registry's prod versions (and any artifact@version) over an OpenAI-compatible API on
# http://127.0.0.1:8000/v1 (README, "Serving"); Ctrl-C stops it. Options: `ptune serve --help`.
serve: $(STAMP)
	ptune serve

clean-env:
	rm -rf $(VENV)
