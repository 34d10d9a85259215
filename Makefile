# The two commands a new machine needs: `make run` (daemon, with an embedded
# throwaway Ceph cluster unless one is configured) and `make test` (everything).
# Both call `make setup`, which installs only what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= /etc/rbdplugin/rbdplugin.toml
DEV_DIR ?= /var/tmp/rbdplugin-dev
PYTEST_ARGS ?=

# Debian packages: Ceph daemons and bindings (tests and the embedded cluster),
# the fuse mapper's tools, filesystems, and the venv module for Debian's python.
APT_PACKAGES := ceph-mon ceph-osd ceph-common python3-rados python3-rbd python3-venv \
	qemu-system-common qemu-block-extra qemu-utils fuse3 e2fsprogs xfsprogs util-linux curl \
	docker.io busybox-static prometheus \
	qemu-system-x86 debootstrap kmod shellcheck docker-registry fio

.PHONY: setup run test lint unit bench soak fuzz clean guest plugin plugin-base
setup: $(STAMP)
	@scripts/ensure-apt $(APT_PACKAGES)
	@# Bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE would otherwise
	@# make every daemon start compile every module: ~0.1 s).
	@$(PY) -m compileall -q rbdplugin
	@# Keystone and Cinder for Cinder mode's devcloud, in a cached venv of their own.
	@nice -n 10 $(PY) -m rbdplugin.devcloud venv >/dev/null

$(STAMP): pyproject.toml
	@scripts/ensure-apt $(APT_PACKAGES)
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,cinder]'
	@touch $@

run: setup
	@if [ -f "$(CONFIG)" ]; then \
		exec $(VENV)/bin/rbdplugin serve --config "$(CONFIG)"; \
	else \
		echo "rbdplugin: no $(CONFIG); starting an embedded throwaway Ceph cluster in $(DEV_DIR)"; \
		exec $(VENV)/bin/rbdplugin serve --embedded-cluster "$(DEV_DIR)" --socket-dir /run/docker/plugins; \
	fi

GUEST_PY := guest/run guest/files/agent.py
lint: setup
	$(VENV)/bin/ruff check rbdplugin tests bench $(GUEST_PY)
	$(VENV)/bin/ruff format --check rbdplugin tests bench $(GUEST_PY)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict $(GUEST_PY)
	shellcheck guest/build guest/files/init guest/files/net-setup guest/files/rbdplugin tests/kernel/inside.sh \
		plugin/build plugin/make-base plugin/entrypoint

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: setup
	$(VENV)/bin/pytest -m 'not ceph' $(PYTEST_ARGS)

# The plugin API fuzzed at length: 10,000 schemathesis-generated requests from
# docs/plugin-api.openapi.yaml against a real daemon (`make test` runs 600).
FUZZ_EXAMPLES ?= 10000
fuzz: setup
	RBDPLUGIN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -s --timeout=7200 tests/integration/test_fuzz.py $(PYTEST_ARGS)

# Performance targets live here, not in the (untimed) tests: every case next to its floor,
# results in bench/results/ (latest.md, latest.svg); exit 1 if a target is missed.
# `make test` runs the same suite with tiny counts (tests/integration/test_bench_smoke.py).
bench: setup
	$(PY) -m bench.run

# Load: 200 concurrent clients mixing every verb over 1000 names for 10 minutes, real
# mounts; exit 1 on an unexpected error, a missed latency target, growth or a leak.
# Results in bench/results/soak-<date>.{json,md}. `make test` runs a one-minute form
# (tests/integration/test_soak.py). SOAK_ARGS passes options (python -m bench.soak -h).
SOAK_ARGS ?=
soak: setup
	$(PY) -m bench.soak --clients 200 --volumes 1000 --seconds 600 $(SOAK_ARGS)

# Kernel tier: run CMD as root in the cached QEMU guest (Debian's kernel: krbd, rbd-nbd,
# udev). The first use builds the guest into /var/cache/rbdplugin-guest. See guest/README.md.
guest: setup
	@if [ -z "$(CMD)" ]; then echo "usage: make guest CMD='sh -c \"modprobe rbd && ls /sys/bus/rbd\"'" >&2; exit 2; fi
	guest/run $(CMD)

# The managed Docker plugin (plugin/README.md): docker build from BASE, export the rootfs,
# docker plugin create PLUGIN. No registry needed: the default BASE is made locally by
# plugin/make-base (debootstrap + docker import, cached). DOCKER_HOST picks the engine.
PLUGIN ?= rbdplugin:latest
PLUGIN_BASE_TAG := rbdplugin-base:bookworm
BASE ?= $(PLUGIN_BASE_TAG)
PLUGIN_BUILD_DIR ?=
# --preload: the base already holds plugin/packages (shared cache with the tests).
PLUGIN_BASE_FLAGS ?= --preload
plugin-base:
	plugin/make-base $(PLUGIN_BASE_FLAGS) $(PLUGIN_BASE_TAG)

plugin: $(if $(filter $(PLUGIN_BASE_TAG),$(BASE)),plugin-base)
	BASE=$(BASE) plugin/build $(PLUGIN) $(PLUGIN_BUILD_DIR)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
