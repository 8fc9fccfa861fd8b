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
	$(BIN)/python -m pip install -c constraints.txt -e '.[test,bench,hf,tensorboard,plots]'
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

# Every benchmark prints JSON; the README's figures table quotes these runs (about 45 minutes on
# the 2-core CPU, mostly the two tokenizer trainings).
bench: setup
	$(BIN)/python benchmarks/world_generation.py
	rm -rf runs/bench && mkdir -p runs/bench
	$(BIN)/python benchmarks/image_tokenizer.py --train --out runs/bench/image
	$(BIN)/python benchmarks/structure_invariance.py runs/bench/image
	$(BIN)/python benchmarks/audio_codec.py --train --out runs/bench/audio
	$(BIN)/python benchmarks/prepare_throughput.py
	DS_ACCELERATOR=cpu $(BIN)/python benchmarks/train_throughput.py --batch 3 --seq 1536
	DS_ACCELERATOR=cpu $(BIN)/python benchmarks/train_cli_throughput.py
	$(BIN)/python benchmarks/decode_speed.py

clean:
	rm -rf runs .pytest_cache build dist *.egg-info
