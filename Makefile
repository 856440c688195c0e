# persona-governance: the two commands.
#   make test   set up .venv (once) and run the whole test suite, as CI does (the tests
#               marked serial run alone afterwards)
#   make demo   set up .venv (once), build ./demo: an MLflow registry with two audited versions
#   make audit  set up .venv (once), fetch the pinned SmolLM2 + MMLU assets, run one audit
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# test processes: most tests wait on servers and subprocesses, so two share two cores well;
# each file stays on one process (its module fixtures, e.g. a shared server, start once)
WORKERS ?= 2
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup test test-fast lint audit demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

# pytest exits 5 when it collects nothing: that is a failure here, with a message
test: setup
	$(BIN)/ruff check governance jobs tests benchmarks docs
	export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true; \
	  $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not serial" \
	    --durations=15 tests; a=$$?; \
	  $(BIN)/python -m pytest -q -m serial tests; b=$$?; \
	  for rc in $$a $$b; do if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; done; \
	  [ $$a -eq 0 ] && [ $$b -eq 0 ]

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not e2e" tests

lint: setup
	$(BIN)/ruff check governance jobs tests benchmarks docs

audit: setup
	HF_HUB_OFFLINE=1 $(BIN)/persona-gov audit --model smollm2-135m-instruct \
	  --questions mmlu --n-questions 20 --pair "a Black person" "a White person" \
	  --components mlp_out:identity mlp_out:all attn_out:identity attn_out:last head:last \
	  --out out/smollm2-audit

demo: setup
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/persona-gov demo --dir demo

clean:
	rm -rf $(VENV) out
