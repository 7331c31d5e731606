# pgsilo: the two commands that matter are `make demo` and `make test`.
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: build test regress demo up status down bench clean fuzz

build:
	$(CARGO) build --release --workspace

test: target/venv/.ok
	$(CARGO) build --workspace
	$(CARGO) test --workspace -- --nocapture
	CARGO='$(CARGO)' scripts/fuzz.sh --smoke

# Coverage-guided fuzzing (scripts/fuzz.sh, fuzz/README.md): every target in fuzz/ under
# AFL++ for FUZZ_SECONDS each (default 300), FUZZ_JOBS at a time (default 1), resuming
# what earlier runs found (target/fuzz/); prints executions, execs/s, corpus, coverage,
# crashes and hangs per target and fails on a crash or hang. Installs cargo-afl when
# missing. `make test` runs each target 10 s from scratch when cargo-afl is installed.
fuzz:
	CARGO='$(CARGO)' scripts/fuzz.sh

# psycopg 3 for the Python clients of the transaction-pooling tests (tests/py/); the tests
# use target/venv/bin/python, or $PGSILO_PYTHON.
target/venv/.ok:
	python3 -m venv --clear target/venv
	target/venv/bin/pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.1'
	touch $@

# PostgreSQL's own regression suite (scripts/regress.sh, about a minute once set up): the
# installed postgresql-15's src/test/regress, parallel_schedule, against a throwaway
# cluster, first directly, then through pgsilo in session mode. Fails on a failure
# directly, or through pgsilo unless regress/expected_differences.txt lists the test with
# its reason. Installs postgresql-server-dev-15 and dpkg-dev and adds a deb-src entry for
# `apt-get source` when missing (so the first run needs root). Results in target/regress/.
regress:
	CARGO='$(CARGO)' scripts/regress.sh

up: build
	scripts/dev.sh up

status:
	scripts/dev.sh status

down:
	scripts/dev.sh down

# The noisy-neighbour comparison (scripts/demo.sh): PostgreSQL, both tenants and one shared
# instance, pgsilo-loadtest compare (about a minute), report in target/demo/; stops
# everything it started, also on failure or Ctrl-C. DEMO_DURATION=8s sets each phase.
demo: build
	scripts/demo.sh

# pgsilo vs PgBouncer vs PostgreSQL with pgbench, and memory per idle client (benches/run.sh,
# about 10 minutes; BENCH_QUICK=1 about 4). Report in target/bench/report.md. Not part of
# `make test`; the micro benchmarks are `cargo bench`. See benches/README.md.
bench:
	CARGO='$(CARGO)' benches/run.sh

clean:
	scripts/dev.sh down >/dev/null 2>&1 || true
	$(CARGO) clean

# --- make install / make uninstall: the binary, the systemd template unit, example configs.
#   make install [PREFIX=/usr/local] [DESTDIR=] [UNITDIR=/etc/systemd/system] [PGSILO_BIN=path]
# Builds the release binary first, unless PGSILO_BIN names one to install as it is.
# Without DESTDIR it also creates the system user `pgsilo` and reloads systemd; with
# DESTDIR (packaging) it does neither, and the package must chgrp the configs to pgsilo.
# Existing files under /etc/pgsilo are never overwritten. See systemd/README.md.
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= /etc/systemd/system
# Fixed: the unit reads /etc/pgsilo/%i.toml and runs as pgsilo.
PGSILO_CONFDIR := /etc/pgsilo
PGSILO_USER := pgsilo
PGSILO_BIN ?= $(or $(CARGO_TARGET_DIR),target)/release/pgsilo
PGSILO_EXAMPLES := tenant_a.toml tenant_b.toml userlist_tenant_a.txt userlist_tenant_b.txt

.PHONY: install uninstall

install: $(if $(filter command line environment,$(origin PGSILO_BIN)),,build)
	@test -x '$(PGSILO_BIN)' || { echo "make install: no binary at $(PGSILO_BIN)" >&2; exit 1; }
	install -d '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(UNITDIR)'
	install -m 0755 '$(PGSILO_BIN)' '$(DESTDIR)$(BINDIR)/pgsilo'
	sed 's|/usr/local/bin/pgsilo|$(BINDIR)/pgsilo|g' systemd/pgsilo@.service >'$(DESTDIR)$(UNITDIR)/.pgsilo@.service.tmp'
	chmod 0644 '$(DESTDIR)$(UNITDIR)/.pgsilo@.service.tmp'
	mv -f '$(DESTDIR)$(UNITDIR)/.pgsilo@.service.tmp' '$(DESTDIR)$(UNITDIR)/pgsilo@.service'
	@set -e; if [ -z '$(DESTDIR)' ] && ! getent passwd $(PGSILO_USER) >/dev/null; then \
	  if getent group $(PGSILO_USER) >/dev/null; then group="--gid $(PGSILO_USER)"; else group=--user-group; fi; \
	  echo "creating system user $(PGSILO_USER)"; \
	  useradd --system $$group --home-dir /nonexistent --no-create-home \
	    --shell /usr/sbin/nologin --comment 'pgsilo connection pooler' $(PGSILO_USER); \
	fi
	@set -e; umask 077; dir='$(DESTDIR)$(PGSILO_CONFDIR)'; \
	if [ -z '$(DESTDIR)' ]; then own="root:$(PGSILO_USER)"; else own=; fi; \
	if [ ! -d "$$dir" ]; then \
	  install -d -m 0750 "$$dir"; [ -z "$$own" ] || chown "$$own" "$$dir"; \
	fi; \
	for f in $(PGSILO_EXAMPLES); do \
	  dest="$$dir/$$f"; \
	  if [ -e "$$dest" ] || [ -L "$$dest" ]; then echo "keeping existing $$dest"; continue; fi; \
	  case $$f in \
	    *.toml) sed -e 's/^\(cpus *=.*\)$$/# \1  (installed: cores come from CPUAffinity=, see pgsilo@.service)/' \
	              "config/$$f" >"$$dest.tmp" ;; \
	    *) cat "config/$$f" >"$$dest.tmp" ;; \
	  esac; \
	  chmod 0640 "$$dest.tmp"; [ -z "$$own" ] || chown "$$own" "$$dest.tmp"; \
	  mv "$$dest.tmp" "$$dest"; echo "installed $$dest"; \
	done
	@if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "next: edit $(PGSILO_CONFDIR)/TENANT.toml, then systemctl enable --now pgsilo@TENANT"

uninstall:
	@if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then \
	  systemctl stop 'pgsilo@*.service' || true; \
	fi
	rm -f '$(DESTDIR)$(BINDIR)/pgsilo' '$(DESTDIR)$(UNITDIR)/pgsilo@.service'
	rm -f '$(DESTDIR)'/etc/systemd/system/*.wants/pgsilo@*.service
	@if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then \
	  systemctl daemon-reload; systemctl reset-failed 'pgsilo@*.service' 2>/dev/null || true; \
	fi
	@echo "kept $(PGSILO_CONFDIR), drop-ins under /etc/systemd/system/pgsilo@*.service.d and user $(PGSILO_USER)"
