/*
 * LD_PRELOAD for QEMU's tools in the integration tests (conftest.py's run() sets it for qemu-*):
 * getrusage(RUSAGE_THREAD) reports a thousand times the thread's user CPU time.
 *
 * Why: before every encrypted create (qemu-img create/convert/measure/amend -o encrypt...,
 * -f luks) QEMU 7.2 calibrates PBKDF2 twice (crypto/pbkdf.c qcrypto_pbkdf2_count_iters: it
 * grows the iteration count until one run takes over 500 ms of thread CPU, then extrapolates to
 * a second), whatever iter-time asks for: 1-3 CPU-s per image, most of the suite's LUKS time.
 * With the clock scaled, the first 2^15-iteration run already reads over 500 ms, so the
 * calibration costs ~1/50 of that; the iteration counts it then writes (iter-time=10 in the
 * tests) drop to QEMU's own floor of 1000 for the key slot and the master key digest. Everything
 * else QEMU does - the header, the key material, the ciphers, every byte of data - is unchanged,
 * and vdisk opens those images with the iteration count the header names, as with any other.
 * Not gone: QEMU's "Unable to get accurate CPU usage" (a run measured at 0 ms) still comes
 * often on a loaded machine, so conftest.py's qemu_img() retries it.
 *
 * Built without sanitizers (the peers are not instrumented; an ASan shim could not be preloaded).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>

int getrusage(int who, struct rusage *usage)
{
    int (*real)(int, struct rusage *) = (int (*)(int, struct rusage *))dlsym(RTLD_NEXT, "getrusage");
    if (!real) {
        return -1;
    }
    int r = real(who, usage);
    if (r == 0 && who == RUSAGE_THREAD) {
        long long us = ((long long)usage->ru_utime.tv_sec * 1000000 + usage->ru_utime.tv_usec) * 1000;
        usage->ru_utime.tv_sec = us / 1000000;
        usage->ru_utime.tv_usec = us % 1000000;
    }
    return r;
}
