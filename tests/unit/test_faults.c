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

typedef struct {
    int budget;   /* writes/flushes still let through; < 0 = dead */
    bool tear;    /* the failing write lands half */
} Fault;

static int fault_gate(BlockNode *bs)
{
    Fault *f = bs->opaque;
    if (f->budget < 0) {
        return -EIO;
    }
    if (f->budget-- == 0) {
        f->budget = -1;
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
    return vd_pwrite(bs->backing, off, bytes, buf, flags);
}

static int fault_pwrite_zeroes(BlockNode *bs, uint64_t off, uint64_t bytes, int flags)
{
    int g = fault_gate(bs);
    return g ? -EIO : vd_pwrite_zeroes(bs->backing, off, bytes, flags);
}

static int fault_pdiscard(BlockNode *bs, uint64_t off, uint64_t bytes, int flags)
{
    int g = fault_gate(bs);
    return g ? -EIO : vd_pdiscard(bs->backing, off, bytes, flags);
}

static int fault_flush(BlockNode *bs)
{
    int g = fault_gate(bs);
    return g ? -EIO : vd_flush(bs->backing);
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
static int workload(int n, bool tear, uint8_t *model)
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
    VdOpenOptions oo = {.filename = img, .format = "qcow2", .file = filt, .flags = VD_OPEN_RDWR};
    BlockNode *bs = vd_open(&oo, &err);
    vd_node_unref(filt);
    if (!bs) {
        vd_error_free(err);
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

static void every_fault_point(bool tear)
{
    uint8_t model[NBLK];
    memset(model, 0, sizeof(model));
    int total = workload(-1, false, model);
    assert_true(total > 0);
    /* the clean run's own writes below qcow2 bound the fault points: count them once more */
    int points = 0;
    for (int n = 0; n < 4096; n++) {
        memset(model, 0, sizeof(model));
        int issued = workload(n, tear, model);
        verify(model, n, tear);
        points++;
        if (issued == NOPS) {
            break; /* the budget outlived the workload: every point was tried */
        }
    }
    print_message("%d fault points (%s)\n", points, tear ? "torn writes" : "failed writes");
    assert_true(points > NOPS); /* qcow2 writes metadata too: more points than guest ops */
}

static void test_failed_write_at_every_point(void **state)
{
    every_fault_point(false);
}

static void test_torn_write_at_every_point(void **state)
{
    every_fault_point(true);
}

int main(void)
{
    snprintf(img, sizeof(img), "/tmp/vdisk-faults-%d.qcow2", (int)getpid());
    vd_log_set_level(VD_LOG_ERROR); /* every close after a fault warns that its flush failed */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_failed_write_at_every_point),
        cmocka_unit_test(test_torn_write_at_every_point),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    unlink(img);
    return r;
}
