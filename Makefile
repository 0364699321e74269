# qmpbackup — two commands on a fresh Debian 12 machine:
#   make demo   install what is missing, back up and restore a throwaway VM
#   make test   install what is missing, run the whole test suite
# Installing QEMU needs root (apt-get); everything else goes into .venv.

PYTHON   ?= python3
VENV     ?= .venv
VPY      := $(VENV)/bin/python
APT_PKGS := qemu-system-x86 qemu-utils e2fsprogs libfuse3-3 xxhash
JOBS     ?= 2
PYTEST_ARGS ?=

.PHONY: all deps system-deps venv demo test unit lint bench clean

all: test

deps: system-deps venv

# QEMU and qemu-img come from Debian; install them only when missing.  xxhsum (Debian's xxhash)
# is the by-hand check of the checksums, which the tests compare with the code's.
system-deps:
	@missing=""; \
	for tool in qemu-system-x86_64 qemu-img qemu-io mkfs.ext4 xxhsum; do \
	  command -v $$tool >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	[ -f /usr/share/seabios/bios-256k.bin ] || missing="$$missing seabios"; \
	/sbin/ldconfig -p 2>/dev/null | grep -q 'libfuse3\.so\.3' || missing="$$missing libfuse3"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "missing:$$missing — run 'sudo apt-get install $(APT_PKGS)' or run make as root" >&2; exit 1; \
	  fi; \
	  echo "installing$$missing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml requirements.txt tests/requirements.txt
	@if ! [ -x $(VPY) ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    rm -rf $(VENV); \
	    if [ "$$(id -u)" -eq 0 ]; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	    fi; \
	    $(PYTHON) -m venv $(VENV); }; \
	fi
	$(VPY) -m pip install -q --disable-pip-version-check -e . -r tests/requirements.txt
	@touch $@

# Static checks first: a type error fails in seconds, not after the VMs.
lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m mypy

test: deps lint
	$(VPY) -m pytest -n $(JOBS) --timeout=600 -q -rfE tests $(PYTEST_ARGS)

# The pure unit tests (naming, parsing, planning, chain rules, docs): no QEMU needed.
unit: venv
	$(VPY) -m pytest -q tests/unit

demo: deps
	$(VPY) -m tests.demo

bench: deps
	$(VPY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info demo-work .pytest_cache
