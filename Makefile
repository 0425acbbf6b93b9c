# The front door: `make` builds into build/, `make check` runs every test, `make demo` runs the tour.
# Each target first installs missing Debian packages (scripts/install-deps.sh, idempotent).
BUILD      ?= build
ASAN_BUILD ?= build-asan
# pytest-xdist: two workers per core (tests use tmp_path, kernel-chosen ports and per-process
# netns names). A test spends most of its time waiting (for a daemon, a peer's process start, a
# rate-limited job): the whole run uses ~290 CPU-s where 2 cores x ~530 s of three workers
# offered ~1,060 (tests/README.md);
# --dist loadgroup keeps the tests sharing one costly module fixture (the Ceph cluster,
# `make install`) on one worker (pytest.mark.xdist_group).
NPROC      := $(shell nproc)
PYTEST_JOBS ?= $(shell echo $$(( $(NPROC) * 2 )))
# The unit suites sleep too (threads handing work over, timed waits): two per core.
UNIT_JOBS  ?= $(shell echo $$(( $(NPROC) * 2 )))
PYTEST     ?= /usr/bin/python3 -m pytest -p timeout --timeout=300 --durations=25 -n $(PYTEST_JOBS) --dist loadgroup
PREFIX     ?= /usr/local
DESTDIR    ?=

.PHONY: all deps install check check-unit check-asan check-integration demo bench clean fuzz-build fuzz-deps \
	crash-campaign resume-campaign

all: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD)

# UBSan's checks trap (-fsanitize-undefined-trap-on-error: an illegal instruction at the undefined
# behaviour, which ASan reports with its stack, file:line, under handle_sigill=1) instead of
# calling GCC's libubsan. Every check stays, fatal as with halt_on_error=1. Why: at each ASan
# process's exit LeakSanitizer reads every loaded module's writable data, and libubsan's 6 MB of
# BSS plus vdisk's 1.9 MB of UBSan type descriptors were 55% of the 14 MB it read (one page fault
# per untouched 4 KiB page): `vdisk info` 110-118 -> 69-84 ms CPU with leak checks on, and make
# check starts thousands of ASan processes. Nothing about leak detection changes.
UBSAN_TRAP := -fsanitize-undefined-trap-on-error
$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) -Db_sanitize=address,undefined -Db_lundef=false \
	  -Dc_args=$(UBSAN_TRAP) -Dc_link_args=$(UBSAN_TRAP)

asan: deps $(ASAN_BUILD)/build.ninja
	ninja -C $(ASAN_BUILD)

# vdisk, vdiskd, their man pages, the systemd unit and bash completion under $(DESTDIR)$(PREFIX).
# The prefix is set only when it changes: `meson configure` regenerates the whole build (~10 CPU-s).
install: all
	@[ "$$(meson introspect --buildoptions $(BUILD) | /usr/bin/python3 -c 'import json, sys; \
	  print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "prefix"))')" = "$(PREFIX)" ] || \
	  meson configure $(BUILD) -Dprefix=$(PREFIX)
	DESTDIR="$(DESTDIR)" meson install -C $(BUILD)

check: all asan
	meson test -C $(BUILD) --print-errorlogs --num-processes $(UNIT_JOBS)
	ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_summary=1:handle_sigill=1 \
	  meson test -C $(ASAN_BUILD) --print-errorlogs --num-processes $(UNIT_JOBS)
	VDISK_BUILD=$(CURDIR)/$(ASAN_BUILD) $(PYTEST) -q tests/integration

demo: all
	VDISK=$(CURDIR)/$(BUILD)/src/tools/vdisk scripts/demo.sh
	VDISK_BUILD=$(CURDIR)/$(BUILD) scripts/demo-live.sh

bench: all
	bench/run.sh

# kill -9 of vdiskd during guest writes and block jobs, then qemu-img check and the flushed
# writes verified (scripts/crash-campaign.py; make check runs a few trials).
TRIALS ?= 25
crash-campaign: all
	VDISK_BUILD=$(CURDIR)/$(BUILD) /usr/bin/python3 scripts/crash-campaign.py $(TRIALS)

# kill -9 of vdiskd --state-dir during live copies with a guest writing, restart, job-resume:
# target == source and the bytes copied after the restart bounded (scripts/resume-campaign.py).
resume-campaign: all
	VDISK_BUILD=$(CURDIR)/$(BUILD) /usr/bin/python3 scripts/resume-campaign.py $(TRIALS)

# libFuzzer targets (fuzz/), built with clang + ASan/UBSan in their own directory. `make fuzz` runs
# each for FUZZ_SECONDS on a scratch copy of its committed seed corpus (fuzz/corpus/<target>);
# a crash stops the run and leaves crash-* in $(FUZZ_BUILD). FUZZ_JOBS runs several at once.
FUZZ_BUILD   ?= build-fuzz
FUZZ_SECONDS ?= 20
FUZZ_TARGETS ?= qcow2 nbd qmp
# A 16 MiB quarantine (ASan's default: 256) still catches use after free of anything freed in the
# last few thousand inputs, and reusing memory sooner halves the page faults per input.
FUZZ_ASAN_OPTIONS ?= detect_leaks=0:quarantine_size_mb=16

$(FUZZ_BUILD)/build.ninja:
	CC=clang meson setup $(FUZZ_BUILD) -Dfuzz=true -Db_sanitize=address,undefined \
	  -Db_lundef=false -Dbuildtype=debugoptimized

fuzz-build: deps fuzz-deps $(FUZZ_BUILD)/build.ninja
	ninja -C $(FUZZ_BUILD) $(addprefix fuzz/fuzz_,$(FUZZ_TARGETS))

# clang is needed only by the fuzzers, so make check does not install it.
fuzz-deps:
	@command -v clang >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends clang; }

fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus-$$t && cp -n fuzz/corpus/$$t/* $(FUZZ_BUILD)/corpus-$$t/ ; \
	  echo "fuzz_$$t: $(FUZZ_SECONDS) s"; \
	  (cd $(FUZZ_BUILD) && ASAN_OPTIONS=$(FUZZ_ASAN_OPTIONS) ./fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) \
	    -timeout=60 -detect_leaks=0 -rss_limit_mb=2048 -print_final_stats=1 corpus-$$t) || exit 1; \
	done

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
