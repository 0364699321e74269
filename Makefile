# qmpbackup — two commands on a fresh Debian 12 machine:
#   make demo   install what is missing, back up and restore a throwaway VM
#   make test   install what is missing, run the whole test suite
# Installing QEMU needs root (apt-get); everything else goes into .venv.

PYTHON   ?= python3
VENV     ?= .venv
VPY      := $(VENV)/bin/python
APT_PKGS := qemu-system-x86 qemu-utils e2fsprogs libfuse3-3 sqlite3 busybox systemd xxhash
JOBS     ?= 2
PYTEST_ARGS ?=

# `make install`: a self-contained install for production (root). Every path can be
# overridden, so a test installs into a temporary folder:
#   make install PREFIX=/tmp/t/opt LOCALDIR=/tmp/t/local UNITDIR=/tmp/t/units CONFDIR=/tmp/t/etc
PREFIX      ?= /opt/qmpbackup
LOCALDIR    ?= /usr/local
BINDIR      ?= $(LOCALDIR)/bin
MANDIR      ?= $(LOCALDIR)/share/man
BASHCOMPDIR ?= $(LOCALDIR)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(LOCALDIR)/share/zsh/site-functions
UNITDIR     ?= $(LOCALDIR)/lib/systemd/system
CONFDIR     ?= /etc/qmpbackup
COMMANDS    := qmpbackup qmprestore qmpbackup-vm
UNITS       := qmpbackup@.service qmpbackup@.timer qmpbackup-failed@.service

.PHONY: all deps system-deps venv demo test unit lint bench clean install uninstall man completion

all: test

deps: system-deps venv

# QEMU and qemu-img come from Debian; install them only when missing.  sqlite3
# and busybox are for the fsfreeze hook tests (a real database; the hooks under
# busybox sh as well as dash); systemd-analyze (package systemd) checks the
# shipped units in the tests; xxhsum (Debian's xxhash) is the by-hand check of the
# checksums, which the tests compare with the code's.
system-deps:
	@missing=""; \
	for tool in qemu-system-x86_64 qemu-img qemu-io mkfs.ext4 sqlite3 busybox systemd-analyze xxhsum; do \
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

# A venv in $(1); Debian's python3 has no ensurepip without python3-venv, which root gets here.
define make_venv
	@if ! [ -x $(1)/bin/python ]; then \
	  $(PYTHON) -m venv $(1) 2>/dev/null || { \
	    rm -rf $(1); \
	    if [ "$$(id -u)" -eq 0 ]; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	    fi; \
	    $(PYTHON) -m venv $(1); }; \
	fi
endef

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml requirements.txt tests/requirements.txt
	$(call make_venv,$(VENV))
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

# Production install: its own venv in $(PREFIX) with a normal (non-editable) `pip install .`,
# so the checkout can go afterwards; commands linked into $(BINDIR); man pages, bash and
# zsh completion (generated from the parsers, committed in contrib/); the systemd units
# with absolute paths; $(CONFDIR)/example.conf. Running it again upgrades in place.
install:
	$(call make_venv,$(PREFIX))
	rm -rf build   # setuptools would package stale modules left in build/lib
	$(PREFIX)/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir --upgrade .
	install -m 0755 contrib/qmpbackup-vm $(PREFIX)/bin/qmpbackup-vm
	install -d $(BINDIR) $(MANDIR)/man1 $(BASHCOMPDIR) $(ZSHCOMPDIR) $(UNITDIR) $(CONFDIR)
	for c in $(COMMANDS); do ln -sfn $(PREFIX)/bin/$$c $(BINDIR)/$$c; done
	install -m 0644 contrib/man/qmpbackup.1 contrib/man/qmprestore.1 $(MANDIR)/man1/
	for c in qmpbackup qmprestore; do \
	  install -m 0644 contrib/completion/$$c.bash $(BASHCOMPDIR)/$$c; \
	  install -m 0644 contrib/completion/_$$c $(ZSHCOMPDIR)/_$$c; done
	for u in $(UNITS); do \
	  sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/etc/qmpbackup/|$(CONFDIR)/|g' \
	    contrib/systemd/$$u > $(UNITDIR)/$$u && chmod 0644 $(UNITDIR)/$$u; done
	install -m 0644 contrib/systemd/example.conf $(CONFDIR)/example.conf
	@echo "installed in $(PREFIX); commands in $(BINDIR). systemd: systemctl daemon-reload," \
	  "then see README (cron and systemd)"

# Removes what `make install` put there; $(CONFDIR)/*.conf of your VMs stay.
uninstall:
	for c in $(COMMANDS); do rm -f $(BINDIR)/$$c; done
	rm -f $(MANDIR)/man1/qmpbackup.1 $(MANDIR)/man1/qmprestore.1
	for c in qmpbackup qmprestore; do rm -f $(BASHCOMPDIR)/$$c $(ZSHCOMPDIR)/_$$c; done
	for u in $(UNITS); do rm -f $(UNITDIR)/$$u; done
	rm -f $(CONFDIR)/example.conf
	-rmdir $(CONFDIR) 2>/dev/null
	rm -rf $(PREFIX)

# The man pages and completion scripts are generated from the argparse parsers and
# committed (so `make install` needs no generator); tests/unit/test_manpages.py fails when
# they are stale.
man: venv
	$(VPY) -m tools.manpage contrib/man

completion: venv
	$(VPY) -m tools.completion contrib/completion

clean:
	rm -rf $(VENV) build *.egg-info demo-work .pytest_cache
