# ntp-dtls: build, test and demo entry points. CI runs .ci/run, which runs `make test`.
CARGO ?= cargo
# `make install` destination; DESTDIR for staged installs (packaging).
PREFIX ?= /usr/local
DESTDIR ?=
MAN_DIR := target/man

.PHONY: deps build test lint conformance demo bench fuzz certs clean man deb install check-deb

deps:
	bash scripts/install-deps.sh

build:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps
	$(MAKE) --no-print-directory lint
	$(CARGO) test --workspace

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

# Man pages (examples/gen_man.rs): ntp-dtls(1), one page per command and ntp-dtls.toml(5),
# gzipped as Debian ships them.
man:
	@echo "make man: generating the man pages into $(MAN_DIR) (cargo run --release --example gen_man)"
	rm -rf $(MAN_DIR)
	$(CARGO) run --release --quiet --example gen_man -- $(MAN_DIR)
	gzip -9n $(MAN_DIR)/*.1 $(MAN_DIR)/*.5

# A .deb in target/debian/: binary (stripped), both units, sysusers.d entry, example configs,
# man pages, docs; the debug symbols go into a separate -dbgsym .ddeb beside it
# ([package.metadata.deb] dbgsym = true in Cargo.toml).
deb: man
	@if ! $(CARGO) deb --version >/dev/null 2>&1; then \
		echo "make deb: cargo-deb is not installed: installing it (cargo install cargo-deb --locked, a few minutes, once)"; \
		$(CARGO) install cargo-deb --locked || exit 1; \
	fi
	@echo "make deb: $$($(CARGO) deb --version): release build (minutes the first time), strip, package"
	$(CARGO) deb
	@for f in target/debian/*.deb target/debian/*.ddeb; do \
		[ -f "$$f" ] && echo "make deb: $$f: $$(du -h "$$f" | cut -f1)"; \
	done; true

# What `make deb` packages, for a system without dpkg. Units get ExecStart under $(PREFIX).
install: build man
	@echo "make install: installing under $(DESTDIR)$(PREFIX)"
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/systemd/system \
		$(DESTDIR)$(PREFIX)/lib/sysusers.d $(DESTDIR)$(PREFIX)/share/man/man1 \
		$(DESTDIR)$(PREFIX)/share/man/man5 \
		$(DESTDIR)$(PREFIX)/share/doc/ntp-dtls/examples
	install -m 755 target/release/ntp-dtls $(DESTDIR)$(PREFIX)/bin/ntp-dtls
	for unit in dist/systemd/*.service; do \
		sed -e 's|^ExecStart=/usr/bin/ntp-dtls |ExecStart=$(PREFIX)/bin/ntp-dtls |' \
			-e 's|/usr/share/doc/ntp-dtls/|$(PREFIX)/share/doc/ntp-dtls/|g' $$unit \
			>$(DESTDIR)$(PREFIX)/lib/systemd/system/$$(basename $$unit) || exit 1; \
		chmod 644 $(DESTDIR)$(PREFIX)/lib/systemd/system/$$(basename $$unit); \
	done
	install -m 644 dist/sysusers.d/ntp-dtls.conf $(DESTDIR)$(PREFIX)/lib/sysusers.d/
	install -m 644 $(MAN_DIR)/*.1.gz $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 644 $(MAN_DIR)/*.5.gz $(DESTDIR)$(PREFIX)/share/man/man5/
	install -m 644 dist/client.toml dist/server.toml $(DESTDIR)$(PREFIX)/share/doc/ntp-dtls/examples/
	install -m 644 README.md docs/OPERATIONS.md $(DESTDIR)$(PREFIX)/share/doc/ntp-dtls/
	@echo "installed under $(DESTDIR)$(PREFIX). Next: systemd-sysusers (creates the ntp-dtls user),"
	@echo "install -d -m 0750 -g ntp-dtls /etc/ntp-dtls, certificates and a config there,"
	@echo "systemctl daemon-reload; see $(PREFIX)/share/doc/ntp-dtls/OPERATIONS.md"

# Builds the .deb and checks its file list (slow: a release build, and cargo-deb if missing).
check-deb:
	bash scripts/check-deb.sh
