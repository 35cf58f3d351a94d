# event_projections: every entry point a user or CI needs. All targets install what they need first.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGDATA_TEST ?= /var/tmp/event_projections/pgrx-test

.PHONY: setup build install demo test lint soak unit-test connection-test model-check bench clean-cluster package package-test

setup:
	@bash scripts/setup.sh

build: setup
	cargo build --release

# Installs the extension into the system PostgreSQL 15 (what the private clusters load).
install: setup
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh

# `cargo pgrx test` (single-session #[pg_test] tests), then the suites that need real connections
# against a running cluster with the extension preloaded, then the model check.
test: setup
	@bash scripts/test.sh

# Formatting, clippy with every unsafe block explained, and the one-way module layers.
lint: setup
	@bash scripts/lint.sh

# Randomized histories for as long as asked (EP_SOAK_SECONDS, default 600), with the memory of the
# workers and backends, which must stay flat (scripts/soak.sh).
soak: install
	@bash scripts/soak.sh

unit-test: setup
	mkdir -p $(dir $(PGDATA_TEST)) && chown postgres:postgres $(dir $(PGDATA_TEST))
	cargo pgrx test pg15 --runas postgres --pgdata $(PGDATA_TEST)

connection-test: install
	@bash scripts/connection-tests.sh

model-check: setup
	@bash model/check.sh

bench: install
	@bash bench/run.sh

clean-cluster:
	@bash scripts/cluster.sh destroy

# A Debian package of the extension in target/package/ (or $$CARGO_TARGET_DIR/package/).
package: setup
	@bash scripts/package.sh

# Installs that package into a private copy of PostgreSQL 15 and runs the demo on it.
package-test: package
	@bash scripts/package-test.sh
