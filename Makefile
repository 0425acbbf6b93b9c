# The front door: `make` builds into build/, `make check` runs every test, `make demo` runs the tour.
# Each target first installs missing Debian packages (scripts/install-deps.sh, idempotent).
BUILD      ?= build
ASAN_BUILD ?= build-asan
PYTEST     ?= /usr/bin/python3 -m pytest -p timeout --timeout=300
PREFIX     ?= /usr/local
DESTDIR    ?=

.PHONY: all deps install check check-unit check-asan check-integration demo bench clean

all: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD)

$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) -Db_sanitize=address,undefined -Db_lundef=false

asan: deps $(ASAN_BUILD)/build.ninja
	ninja -C $(ASAN_BUILD)

# vdisk, vdiskd, their man pages, the systemd unit and bash completion under $(DESTDIR)$(PREFIX).
install: all
	meson configure $(BUILD) -Dprefix=$(PREFIX)
	DESTDIR="$(DESTDIR)" meson install -C $(BUILD)

check: all asan
	meson test -C $(BUILD) --print-errorlogs
	meson test -C $(ASAN_BUILD) --print-errorlogs
	VDISK_BUILD=$(CURDIR)/$(ASAN_BUILD) $(PYTEST) -q tests/integration

demo: all
	VDISK=$(CURDIR)/$(BUILD)/src/tools/vdisk scripts/demo.sh
	VDISK_BUILD=$(CURDIR)/$(BUILD) scripts/demo-live.sh

bench: all
	bench/run.sh

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
