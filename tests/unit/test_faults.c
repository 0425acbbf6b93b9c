/*
 * test_faults.c - fault injection below qcow2 (as SQLite's test VFS): a filter between the qcow2
 * node and its file lets the first N writes/flushes through, then fails the next one - whole, or
 * torn (its first half written) - and every later one, as if the host lost power there. For every
 * N of a workload that allocates clusters, L2 tables and refcount blocks, the image reopened
 * without the filter must check clean for qemu-img (leaks allowed, as after a QEMU crash) and
 * hold every write a completed flush covered: qcow2's ordering promises, tested.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "block/block.h"
#include "util/log.h"

#define IMG_SIZE (8u << 20)
#define BLK 4096
#define NBLK (IMG_SIZE / BLK)
#define NOPS 32

/* A write the disk's volatile cache holds: what it overwrote, and what it wrote. */
typedef struct {
    uint64_t off, len;
    uint8_t *old, *new;
} Unflushed;

#define MAX_UNFLUSHED 4096

typedef struct {
    int budget;   /* writes/flushes still let through; < 0 = dead */
    bool tear;    /* the failing write lands half */
    /*
     * A volatile write cache: at the fault, the writes since the last completed flush are lost
     * except the newest one, which reached the platter first - the reordering a missing flush
     * between two writes exposes (SQLite's crash VFS does the same with its unsynced pages).
     */
    bool cache;
    Unflushed log[MAX_UNFLUSHED];
    int nlog;
} Fault;

static void log_clear(Fault *f)
{
    for (int i = 0; i < f->nlog; i++) {
        free(f->log[i].old);
        free(f->log[i].new);
    }
    f->nlog = 0;
}

/* Before a write through to the file: remember what it overwrites (zeroes past the end). */
static void log_write(BlockNode *bs, uint64_t off, uint64_t len, const void *buf)
{
    Fault *f = bs->opaque;
    if (!f->cache) {
        return;
    }
    assert_true(f->nlog < MAX_UNFLUSHED);
    Unflushed *u = &f->log[f->nlog++];
    u->off = off;
    u->len = len;
    u->old = calloc(1, len);
    u->new = calloc(1, len);
    assert_non_null(u->old);
    assert_non_null(u->new);
    int64_t end = vd_getlength(bs->backing);
    if ((int64_t)off < end) {
        uint64_t n = (uint64_t)end - off < len ? (uint64_t)end - off : len;
        assert_int_equal(vd_pread(bs->backing, off, n, u->old), 0);
    }
    if (buf) {
        memcpy(u->new, buf, len);
    }
}

/* The power goes: every unflushed write but the newest is undone (newest first), then the
 * newest is written again over whatever the undoing restored under it. */
static void log_crash(BlockNode *bs)
{
    Fault *f = bs->opaque;
    for (int i = f->nlog - 2; i >= 0; i--) {
        vd_pwrite(bs->backing, f->log[i].off, f->log[i].len, f->log[i].old, 0);
    }
    if (f->nlog > 1) {
        Unflushed *u = &f->log[f->nlog - 1];
        vd_pwrite(bs->backing, u->off, u->len, u->new, 0);
    }
    log_clear(f);
}

static int fault_gate(BlockNode *bs)
{
    Fault *f = bs->opaque;
    if (f->budget < 0) {
        return -EIO;
    }
    if (f->budget-- == 0) {
        f->budget = -1;
        if (f->cache) {
            log_crash(bs);
        }
        return 1; /* this one fails */
    }
    return 0;
}

static int fault_pwrite(BlockNode *bs, uint64_t off, uint64_t bytes, const void *buf, int flags)
{
    int g = fault_gate(bs);
    if (g < 0) {
        return g;
    }
    if (g == 1) {
        Fault *f = bs->opaque;
        if (f->tear && bytes >= 1024) {
            vd_pwrite(bs->backing, off, bytes / 2 & ~511ull, buf, 0);
        }
        return -EIO;
    }
    log_write(bs, off, bytes, buf);
    return vd_pwrite(bs->backing, off, bytes, buf, flags);
}

static int fault_pwrite_zeroes(BlockNode *bs, uint64_t off, uint64_t bytes, int flags)
{
    int g = fault_gate(bs);
    if (g) {
        return -EIO;
    }
    log_write(bs, off, bytes, NULL);
    return vd_pwrite_zeroes(bs->backing, off, bytes, flags);
}

static int fault_pdiscard(BlockNode *bs, uint64_t off, uint64_t bytes, int flags)
{
    int g = fault_gate(bs);
    if (g) {
        return -EIO;
    }
    Fault *f = bs->opaque;
    if (f->cache) {
        return -ENOTSUP; /* what a discard leaves is undefined: keep the cache model exact */
    }
    return vd_pdiscard(bs->backing, off, bytes, flags);
}

static int fault_flush(BlockNode *bs)
{
    int g = fault_gate(bs);
    if (g) {
        return -EIO;
    }
    int r = vd_flush(bs->backing);
    if (r == 0) {
        log_clear(bs->opaque);
    }
    return r;
}

static int fault_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                          VdError **errp)
{
    int g = fault_gate(bs);
    if (g) {
        vd_error_setg(errp, EIO, "injected fault");
        return -EIO;
    }
    return vd_truncate(bs->backing, size, shrink, prealloc, errp);
}

static const BlockDriver fault_drv = {
    .name = "test-fault",
    .is_protocol = true,
    .state_size = sizeof(Fault),
    .pread = vd_filter_pread,
    .pwrite = fault_pwrite,
    .pwrite_zeroes = fault_pwrite_zeroes,
    .pdiscard = fault_pdiscard,
    .flush = fault_flush,
    .getlength = vd_filter_getlength,
    .truncate = fault_truncate,
};

static char img[64];

/*
 * The workload over a fault filter with budget n: writes (new clusters, rewrites), a discard
 * and flushes; model[b] = the value block b holds once a flush covered it (0 = never written).
 * Returns how many writes/flushes it issued before the first failure (or all of them).
 */
static int workload(int n, bool tear, bool cache, uint8_t *model)
{
    VdCreateOptions co = {.format = "qcow2", .size = IMG_SIZE, .size_given = true,
                          .cluster_size = 65536};
    unlink(img);
    VdError *err = NULL;
    assert_int_equal(vd_create(&co, img, &err), 0);
    BlockNode *file = vd_open_image(img, "file", VD_OPEN_RDWR, &err);
    assert_non_null(file);
    BlockNode *filt = vd_filter_new(&fault_drv, file, NULL);
    assert_non_null(filt);
    vd_node_unref(file);
    Fault *f = filt->opaque;
    f->budget = n < 0 ? 1 << 30 : n;
    f->tear = tear;
    f->cache = cache;
    VdOpenOptions oo = {.filename = img, .format = "qcow2", .file = filt, .flags = VD_OPEN_RDWR};
    BlockNode *bs = vd_open(&oo, &err);
    if (!bs) {
        vd_error_free(err);
        log_clear(f);
        vd_node_unref(filt);
        return 0;
    }
    uint8_t pending[NBLK];
    memcpy(pending, model, NBLK);
    unsigned seed = 7;
    uint8_t buf[BLK];
    int issued = 0;
    for (int i = 0; i < NOPS; i++) {
        seed = seed * 1103515245 + 12345;
        unsigned b = (seed >> 8) % NBLK;
        uint8_t v = (uint8_t)(i + 1);
        memset(buf, v, BLK);
        int r;
        if (i % 7 == 6) {
            r = vd_flush(bs);
            if (r == 0) {
                memcpy(model, pending, NBLK);
            }
        } else {
            r = vd_pwrite(bs, (uint64_t)b * BLK, BLK, buf, 0);
            if (r == 0) {
                pending[b] = v;
            }
        }
        if (r < 0) {
            break;
        }
        issued++;
    }
    vd_node_unref(bs); /* its final writes fail too once the filter is dead */
    log_clear(f);
    vd_node_unref(filt);
    return issued;
}

/* Reopened without the filter: clean for qemu-img, and every flushed write there. */
static void verify(const uint8_t *model, int n, bool tear)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s' >/dev/null 2>&1", img);
    int rc = system(cmd);
    rc = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    if (rc != 0 && rc != 3) { /* 3: leaked clusters only */
        fail_msg("fault after %d operations (%s): qemu-img check exit %d", n,
                 tear ? "torn" : "failed", rc);
    }
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(img, "qcow2", 0, &err);
    assert_non_null(bs);
    uint8_t buf[BLK];
    for (unsigned b = 0; b < NBLK; b++) {
        if (!model[b]) {
            continue;
        }
        assert_int_equal(vd_pread(bs, (uint64_t)b * BLK, BLK, buf), 0);
        for (unsigned i = 0; i < BLK; i++) {
            if (buf[i] != model[b]) {
                fail_msg("fault after %d operations (%s): block %u byte %u is %u, flushed %u",
                         n, tear ? "torn" : "failed", b, i, buf[i], model[b]);
            }
        }
    }
    vd_node_unref(bs);
}

static void every_fault_point(bool tear, bool cache)
{
    uint8_t model[NBLK];
    memset(model, 0, sizeof(model));
    int total = workload(-1, false, cache, model);
    assert_true(total > 0);
    /* the clean run's own writes below qcow2 bound the fault points: count them once more */
    int points = 0;
    for (int n = 0; n < 4096; n++) {
        memset(model, 0, sizeof(model));
        int issued = workload(n, tear, cache, model);
        verify(model, n, tear);
        points++;
        if (issued == NOPS) {
            break; /* the budget outlived the workload: every point was tried */
        }
    }
    print_message("%d fault points (%s)\n", points,
                  cache ? "volatile cache" : tear ? "torn writes" : "failed writes");
    assert_true(points > NOPS); /* qcow2 writes metadata too: more points than guest ops */
}

/*
 * A crash during amend's compat downgrade (1.1 -> 0.10), at every write and flush it makes,
 * with the volatile cache above: e4fa869's ordering - the clusters that stay allocated are
 * zeroed and flushed before their L2 entries drop the zero flag - is what keeps a crash from
 * showing the old data under a zero cluster. The image (64 KiB clusters, no backing) has data,
 * zero clusters that keep their allocation over old data (qemu-io write -z), and unallocated
 * zero clusters (write -z -u; write -z past the data). After each crash qemu-img check must
 * find no corruption, and the guest's bytes must still be the original's (qemu-img compare
 * with a raw copy taken before: QEMU is the oracle for both).
 */
static char amend_src[80], amend_raw[80];

static void copy_file(const char *from, const char *to)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", from, to);
    assert_int_equal(system(cmd), 0);
}

static int sh(const char *fmt, ...)
{
    char cmd[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* amend compat=0.10 of img through the cache filter with budget n: true if it completed. */
static bool amend_with_fault(int n)
{
    copy_file(amend_src, img);
    VdError *err = NULL;
    BlockNode *file = vd_open_image(img, "file", VD_OPEN_RDWR, &err);
    assert_non_null(file);
    BlockNode *filt = vd_filter_new(&fault_drv, file, NULL);
    assert_non_null(filt);
    vd_node_unref(file);
    Fault *f = filt->opaque;
    f->budget = n < 0 ? 1 << 30 : n;
    f->cache = true;
    VdOpenOptions oo = {.filename = img, .format = "qcow2", .file = filt, .flags = VD_OPEN_RDWR};
    BlockNode *bs = vd_open(&oo, &err);
    if (!bs) {
        vd_error_free(err);
        vd_node_unref(filt);
        return false;
    }
    VdAmendOptions ao = {.compat = "0.10", .lazy_refcounts = -1};
    int r = vd_amend(bs, &ao, &err);
    vd_error_free(err);
    bool done = r == 0 && f->budget >= 0;
    vd_node_unref(bs); /* its closing writes fail too once the filter is dead */
    log_clear(f);
    vd_node_unref(filt);
    return done;
}

static void test_amend_downgrade_crash_at_every_point(void **state)
{
    snprintf(amend_src, sizeof(amend_src), "%s.src", img);
    snprintf(amend_raw, sizeof(amend_raw), "%s.raw", img);
    assert_int_equal(sh("qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=65536 '%s' 2M",
                        amend_src), 0);
    assert_int_equal(sh("qemu-io -f qcow2 -c 'write -P 0xaa 0 1M' -c 'write -z 0 256k' "
                        "-c 'write -z -u 256k 128k' -c 'write -z 1536k 128k' '%s' >/dev/null",
                        amend_src), 0);
    /* the zero clusters over old data are there: qemu-img map reports them allocated, zero */
    assert_int_equal(sh("qemu-img map --output=json '%s' | grep -q "
                        "'\"start\": 0, \"length\": 262144, .*\"zero\": true, "
                        "\"data\": false, \"offset\"'", amend_src), 0);
    assert_int_equal(sh("qemu-img convert -O raw '%s' '%s'", amend_src, amend_raw), 0);
    int points = 0;
    for (int n = 0; n < 1000; n++) {
        bool done = amend_with_fault(n);
        int rc = sh("qemu-img check -q '%s' >/dev/null 2>&1", img);
        if (rc != 0 && rc != 3) {
            fail_msg("amend crashed after %d writes/flushes: qemu-img check exit %d", n, rc);
        }
        if (sh("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", img, amend_raw) != 0) {
            fail_msg("amend crashed after %d writes/flushes: the guest's bytes changed", n);
        }
        points++;
        if (done) {
            assert_int_equal(sh("qemu-img info '%s' | grep -q 'compat: 0.10'", img), 0);
            break;
        }
    }
    print_message("%d fault points in amend's downgrade\n", points);
    assert_true(points > 4); /* zeroes, their flush, L2 tables, the header at least */
    unlink(amend_src);
    unlink(amend_raw);
}

static void test_failed_write_at_every_point(void **state)
{
    every_fault_point(false, false);
}

static void test_torn_write_at_every_point(void **state)
{
    every_fault_point(true, false);
}

/* refcounts before L2, L2 before L1, data before its L2 entry: with writes reordered */
static void test_cached_write_at_every_point(void **state)
{
    every_fault_point(false, true);
}

int main(void)
{
    snprintf(img, sizeof(img), "/tmp/vdisk-faults-%d.qcow2", (int)getpid());
    vd_log_set_level(VD_LOG_ERROR); /* every close after a fault warns that its flush failed */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_failed_write_at_every_point),
        cmocka_unit_test(test_torn_write_at_every_point),
        cmocka_unit_test(test_cached_write_at_every_point),
        cmocka_unit_test(test_amend_downgrade_crash_at_every_point),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    unlink(img);
    return r;
}
