# ntp-dtls: build, test and demo entry points. CI runs .ci/run, which runs `make test`.
CARGO ?= cargo

.PHONY: deps build test lint conformance demo bench fuzz certs clean

deps:
	bash scripts/install-deps.sh

build:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

test: deps
	$(MAKE) --no-print-directory lint
	$(CARGO) test

# The OpenSSL conformance suite alone, as a table of cases and NDcPP elements (`make test` runs
# it too, as part of cargo test).
conformance: deps
	bash scripts/conformance.sh

demo:
	bash scripts/demo.sh

bench:
	bash scripts/bench.sh

fuzz:
	@if [ -f scripts/fuzz.sh ]; then bash scripts/fuzz.sh; else echo "fuzz: scripts/fuzz.sh not written yet"; fi

certs:
	$(CARGO) run --release -- certs --out certs --server-name localhost --server-name 127.0.0.1

clean:
	$(CARGO) clean
