# Quick start: `make demo` (train + evaluate on the embedded dataset), `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= outputs/demo

.PHONY: install demo demo-all test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m pouta_jax.demo --workdir=$(DEMO_DIR)

# The demo with PRN as well (about 4 more minutes on 2 cores); BACKBONE_WEIGHTS=resnet18.npz
# gives PRN a pretrained backbone (python -m pouta_jax.convert --from=torchvision_resnet).
demo-all: install
	$(BIN)/python -m pouta_jax.demo --workdir=$(DEMO_DIR)-all --models=draem,pouta,prn \
		--backbone_weights=$(BACKBONE_WEIGHTS)

# Every test file in TEST_WORKERS processes (pytest-xdist, whole files per process), sharing one
# compilation cache. pytest exits 5 when it collects no tests: that is a failure here, said out
# loud.
TEST_WORKERS ?= 2
test: install
	@cache=$$(mktemp -d); trap 'rm -rf "$$cache"' EXIT; export JAX_COMPILATION_CACHE_DIR=$$cache; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; \
	exit $$rc

# The formatter and linter (ruff, settings in pyproject.toml); `ruff format .` fixes the layout.
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Benchmarks against anomalib (PyTorch, CPU wheels): bench/README.md says what each figure means.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	cd bench && ../$(BIN)/python run_all.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
