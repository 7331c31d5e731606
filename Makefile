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

# The noisy-neighbour comparison (scripts/demo.sh): PostgreSQL, both tenants and one shared
# instance, pgsilo-loadtest compare (about a minute), report in target/demo/; stops
# everything it started, also on failure or Ctrl-C. DEMO_DURATION=8s sets each phase.
demo: build
	scripts/demo.sh

clean:
	scripts/dev.sh down >/dev/null 2>&1 || true
	$(CARGO) clean
