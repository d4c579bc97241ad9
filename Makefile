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

# pytest exits 5 when it collects no tests: that is a failure here, said out loud.
# TEST_WORKERS=2 runs test files in 2 processes (pytest-xdist): about twice as fast on 2 cores,
# but there the two-process tests (test_multihost.py) can miss jax's 30 s collective start-up
# under the other worker's load, so the default is one process.
TEST_WORKERS ?= 0
test: install
	@$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; exit $$rc

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
