# upmig — build, demo, test, bench. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STUB   ?= upmig/upmig-stub
INIT   ?= upmig/upmig-init
# Bytecode of every module, compiled here once: each upmig start imports ~40 of them,
# and Python writes none itself where PYTHONDONTWRITEBYTECODE is set or the tree is
# read-only (then every start compiles them all again, ~130 ms here).
BYTECODE := upmig/__pycache__/.compiled
# The stub is linked far from where programs and their libraries live, so that an
# image's own mappings never need the stub's address (resume unmaps it early anyway).
STUB_BASE   := 0x3ff000000000
STUB_CFLAGS := -Os -Wall -Wextra -nostdlib -static -no-pie -fno-pie \
               -Wl,-Ttext-segment=$(STUB_BASE) -Wl,--build-id=none -Wl,-z,noexecstack

.PHONY: all help stub init demo test fuzz bench lint clean

all: $(VENV)/.installed $(STUB) $(INIT) $(BYTECODE) ## build everything into .venv (editable install, helper, stub, init, bytecode)

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

stub: $(STUB) ## build the static stub loader

$(STUB): csrc/stub.c Makefile
	$(CC) $(STUB_CFLAGS) -o $@ $<

init: $(INIT) ## build the PID 1 of `upmig resume --pidns`

$(INIT): csrc/init.c Makefile
	$(CC) -O2 -Wall -Wextra -o $@ $<

# The editable install is of the compat kind, a plain .pth entry: the default one puts
# a finder in site-packages that imports pathlib, importlib.util, fnmatch and
# urllib.parse at every start of Python (~20 ms of upmig's fixed cost), which an
# installed upmig does not pay.
$(VENV)/.installed: setup.py pyproject.toml csrc/helper.c csrc/helper.h csrc/build_helper.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q pytest ruff
	$(PY) -m pip install -q -e . --config-settings editable_mode=compat
	touch $@

$(BYTECODE): $(VENV)/.installed $(shell find upmig -name '*.py')
	$(PY) -m compileall -q upmig
	touch $@

demo: all ## dump a counting program, kill it, resume it: it counts on
	@PATH=$(CURDIR)/$(VENV)/bin:$$PATH sh tests/demo.sh

test: all ## run the whole test suite
	$(PY) -m pytest -q tests

N    ?= 5000
SEED ?= 1
fuzz: all ## feed upmig N mutants of a real image (make fuzz N=20000 SEED=7); all must be refused cleanly or resume
	$(PY) tests/imagefuzz.py -n $(N) --seed $(SEED)

bench: all ## run the benchmarks and print the table
	$(PY) bench/bench.py

lint: all ## ruff and the C warnings
	$(VENV)/bin/ruff check upmig tests bench csrc
	$(CC) -fsyntax-only -Wall -Wextra -Werror csrc/helper.c csrc/init.c

clean: ## remove build output
	rm -rf $(VENV) build *.egg-info upmig/_helper*.so upmig/_helper.c $(STUB) $(INIT) tests/.build
	find upmig tests bench -name __pycache__ -prune -exec rm -rf {} +
