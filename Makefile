# mathsft: every target works on a fresh clone. `make demo` and `make test` do all set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
MODE ?= lora
DATA_DIR ?=
DATASETS ?=

.PHONY: install test test-all lint demo preprocess train eval bench bench-peers bench-gpu gpu-assets clean

install: $(VENV)/.installed

# Idempotent: re-runs only when pyproject.toml changes. torch is pinned and installed first,
# so pip never resolves an unpinned (multi-GB CUDA) torch.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null || true
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q "$(TORCH_PIN)" ".[dev]"
	touch $@

lint: install
	$(PY) -m ruff check .

# Plain `make test` skips tests marked slow; CI (CI=true) and `make test-all` run them too.
test: install lint
	$(PY) -m pytest -q $(if $(CI),,-m "not slow") $(PYTEST_ARGS)

test-all: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py --mode $(MODE) $(if $(DATA_DIR),--data_dir $(DATA_DIR)) $(if $(DATASETS),--datasets $(DATASETS))

preprocess: install
	$(PY) data.py prepare --config configs/data_gsm8k.yaml $(ARGS)

train: install
	$(PY) sft.py --config configs/train_lora.yaml $(ARGS)

eval: install
	$(PY) evalmath.py --config configs/eval.yaml $(ARGS)

# Peers for the side-by-side benchmarks live in their own venv (never project dependencies). If the
# install fails, `make bench` still runs and reports the missing peer in its table.
PEERS := bench/.venv-peers
$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q $(TORCH_PIN)
	$(PEERS)/bin/python -m pip install -q "$(TORCH_PIN)" transformers peft trl accelerate datasets
	touch $@

bench-peers: $(PEERS)/.installed

bench: install
	-$(MAKE) bench-peers
	$(PY) scripts/bench.py $(ARGS)

# The GPU benchmark (scripts/bench_gpu.py, docs/benchmarks.md "GPU benchmark"). No install step: the GPU
# machine has no network; it runs with the venv's python when there is one, else $(PYTHON).
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/bench_gpu.py $(ARGS)

# gpu_assets/ (git-ignored): what bench-gpu needs from ../shared, to copy to a machine without it.
SHARED ?= ../shared
gpu-assets:
	mkdir -p gpu_assets/models/qwen2.5-0.5b gpu_assets/data/gsm8k
	cp $(SHARED)/models/qwen2.5-0.5b/*.json $(SHARED)/models/qwen2.5-0.5b/merges.txt gpu_assets/models/qwen2.5-0.5b/
	cp $(SHARED)/data/gsm8k/test.jsonl gpu_assets/data/gsm8k/

clean:
	rm -rf outputs logs data/processed data/synthetic .pytest_cache .ruff_cache
