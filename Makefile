# anymodal — set-up, tests and the demo. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint bench clean espeak

setup: $(STAMP) espeak

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

# espeak-ng speaks the demo world's audio. Installed with apt-get when missing and possible;
# without it the world simply has no audio documents.
espeak:
	@command -v espeak-ng >/dev/null 2>&1 && exit 0; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
	  || echo "warning: could not install espeak-ng; the demo world will have no audio"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
	  || echo "warning: could not install espeak-ng; the demo world will have no audio"; \
	else echo "warning: espeak-ng missing and cannot be installed here; the demo world will have no audio"; fi

test: setup
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest tests

demo: setup
	$(BIN)/anymodal demo

lint: setup
	$(BIN)/ruff check anymodal tests benchmarks

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache build dist *.egg-info
