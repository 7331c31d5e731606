# pgsilo: the two commands that matter are `make demo` and `make test`.
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: build test demo up status down bench clean

build:
	$(CARGO) build --release --workspace

test:
	$(CARGO) build --workspace
	$(CARGO) test --workspace -- --nocapture

up: build
	scripts/dev.sh up

status:
	scripts/dev.sh status

down:
	scripts/dev.sh down

# For now: start PostgreSQL and both tenants, run the isolation checks through each
# tenant's port, stop everything (also on failure or Ctrl-C).
demo: build
	@bash -c 'trap "scripts/dev.sh down >/dev/null 2>&1" EXIT INT TERM; scripts/dev.sh up && scripts/dev.sh status && scripts/dev.sh smoke'

clean:
	scripts/dev.sh down >/dev/null 2>&1 || true
	$(CARGO) clean
