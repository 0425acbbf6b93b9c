/*
 * test_qcow2_check.c - the offline qcow2 checker/repairer and measure (formats/qcow2-check.c).
 *
 * Images are made by qemu-img / qemu-io, damaged here byte by byte, then checked through a "file"
 * protocol node. Each case asserts fixed counts (taken from qemu-img check 7.2 on the same damage)
 * and, when qemu-img is installed, that every count equals what qemu-img check reports right now.
 * Repairs are judged by qemu-img check afterwards. A small fuzz loop makes sure damaged metadata
 * never crashes or hangs the checker, and that a check without fix never writes.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "block/block.h"
#include "formats/qcow2-check.h"
#include "formats/qcow2-format.h"

static char tmpdir[64];
static char img_buf[96];
static const char *img = img_buf; /* the image under test (a copy during repair checks) */
static bool have_qemu;

/* ---- helpers ---- */

static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run(const char *fmt, ...)
{
    char cmd[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    char full[1200];
    snprintf(full, sizeof(full), "%s >/dev/null 2>&1", cmd);
    int st = system(full);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Create img with qemu-img (options may be "") and run qemu-io commands separated by ';'. */
static void make_image(const char *opts, const char *size, const char *io_cmds)
{
    unlink(img);
    assert_int_equal(run("qemu-img create -f qcow2 %s%s %s %s", *opts ? "-o " : "", opts, img,
                          size), 0);
    if (io_cmds && *io_cmds) {
        char *cmds = strdup(io_cmds);
        char *save = NULL;
        for (char *c = strtok_r(cmds, ";", &save); c; c = strtok_r(NULL, ";", &save)) {
            assert_int_equal(run("qemu-io -c '%s' %s", c, img), 0);
        }
        free(cmds);
    }
}

static uint64_t rd64(uint64_t off)
{
    int fd = open(img, O_RDONLY);
    assert_true(fd >= 0);
    uint8_t b[8];
    assert_int_equal(pread(fd, b, 8, (off_t)off), 8);
    close(fd);
    return qcow2_be64(b);
}

static uint32_t rd32(uint64_t off)
{
    int fd = open(img, O_RDONLY);
    assert_true(fd >= 0);
    uint8_t b[4];
    assert_int_equal(pread(fd, b, 4, (off_t)off), 4);
    close(fd);
    return qcow2_be32(b);
}

static void wr(uint64_t off, const void *buf, size_t len)
{
    int fd = open(img, O_RDWR);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
    close(fd);
}

static void wr64(uint64_t off, uint64_t v)
{
    uint8_t b[8];
    qcow2_put_be64(b, v);
    wr(off, b, 8);
}

static void wr32(uint64_t off, uint32_t v)
{
    uint8_t b[4];
    qcow2_put_be32(b, v);
    wr(off, b, 4);
}

static unsigned cluster_bits(void) { return rd32(20); }
static uint64_t l1_offset(void) { return rd64(40); }
static uint64_t reftable_offset(void) { return rd64(48); }
static unsigned refcount_order(void) { return rd32(4) == 3 ? rd32(96) : 4; }

static uint64_t l2_entry_addr(unsigned l1_index, unsigned l2_index)
{
    unsigned esize = (rd32(4) == 3 && (rd64(72) & QCOW2_INCOMPAT_EXTL2)) ? 16 : 8;
    uint64_t l2 = rd64(l1_offset() + 8 * l1_index) & QCOW2_L1E_OFFSET_MASK;
    return l2 + (uint64_t)l2_index * esize;
}

static uint64_t data_cluster(unsigned l2_index)
{
    return (rd64(l2_entry_addr(0, l2_index)) & QCOW2_L2E_OFFSET_MASK) >> cluster_bits();
}

/* Set the stored refcount of a cluster (refcount widths of 8 bits and more). */
static void set_refcount(uint64_t cluster, uint64_t v)
{
    unsigned cb = cluster_bits(), order = refcount_order();
    assert_true(order >= 3);
    uint64_t per_block = (1ULL << (cb + 3)) >> order;
    uint64_t rb = rd64(reftable_offset() + 8 * (cluster / per_block)) & QCOW2_REFT_OFFSET_MASK;
    assert_true(rb != 0);
    unsigned bytes = (1u << order) / 8;
    uint8_t b[8];
    for (unsigned i = 0; i < bytes; i++) {
        b[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    }
    wr(rb + (cluster % per_block) * bytes, b, bytes);
}

typedef struct Counts {
    int corruptions, leaks, check_errors, corruptions_fixed, leaks_fixed;
    uint64_t image_end_offset, allocated, total, fragmented, compressed;
} Counts;

static int my_check(int fix, Counts *out, VdError **errp)
{
    VdError *err = NULL;
    BlockNode *file = vd_open_image(img, "file", fix ? VD_OPEN_RDWR : 0, &err);
    if (!file) {
        fail_msg("open %s: %s", img, vd_error_msg(err));
    }
    VdCheckResult res;
    memset(&res, 0, sizeof(res));
    int ret = qcow2_check_file(file, &res, fix | QCOW2_CHECK_QUIET, errp);
    vd_node_unref(file);
    *out = (Counts){ res.corruptions, res.leaks, res.check_errors, res.corruptions_fixed,
                     res.leaks_fixed, res.image_end_offset, res.allocated_clusters,
                     res.total_clusters, res.fragmented_clusters, res.compressed_clusters };
    return ret;
}

/* qemu-img check --output=json; returns false when qemu-img could not check the image. */
static bool qemu_check(const char *repair, Counts *out)
{
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "qemu-img check -U --output=json %s%s %s 2>/dev/null",
             repair ? "-r " : "", repair ? repair : "", img);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof(buf) - 1, p);
    buf[n] = 0;
    pclose(p);
    json_error_t jerr;
    json_t *j = json_loads(buf, 0, &jerr);
    if (!j) {
        return false;
    }
#define GETI(k) (json_integer_value(json_object_get(j, k)))
    *out = (Counts){ (int)GETI("corruptions"), (int)GETI("leaks"), (int)GETI("check-errors"),
                     (int)GETI("corruptions-fixed"), (int)GETI("leaks-fixed"),
                     (uint64_t)GETI("image-end-offset"), (uint64_t)GETI("allocated-clusters"),
                     (uint64_t)GETI("total-clusters"), (uint64_t)GETI("fragmented-clusters"),
                     (uint64_t)GETI("compressed-clusters") };
#undef GETI
    json_decref(j);
    return true;
}

static void assert_counts_equal(const Counts *a, const Counts *b)
{
    assert_int_equal(a->corruptions, b->corruptions);
    assert_int_equal(a->leaks, b->leaks);
    assert_int_equal(a->check_errors, b->check_errors);
    assert_int_equal(a->allocated, b->allocated);
    assert_int_equal(a->total, b->total);
    assert_int_equal(a->fragmented, b->fragmented);
    assert_int_equal(a->compressed, b->compressed);
}

/* Check without fix: fixed expectations, then the same numbers as qemu-img (if installed). */
static void check_expect(int corruptions, int leaks, int check_errors)
{
    Counts m, q;
    struct stat before, after;
    assert_int_equal(stat(img, &before), 0);
    uint8_t *copy_before = NULL;
    {
        FILE *f = fopen(img, "rb");
        copy_before = malloc((size_t)before.st_size + 1);
        assert_non_null(copy_before);
        assert_int_equal(fread(copy_before, 1, (size_t)before.st_size, f), (size_t)before.st_size);
        fclose(f);
    }
    VdError *err = NULL;
    int ret = my_check(0, &m, &err);
    if (ret < 0) {
        fail_msg("check failed: %s", vd_error_msg(err));
    }
    if (getenv("QCHECK_LEARN")) {
        fprintf(stderr, "LEARN check %d %d %d\n", m.corruptions, m.leaks, m.check_errors);
    } else {
        assert_int_equal(m.corruptions, corruptions);
        assert_int_equal(m.leaks, leaks);
        assert_int_equal(m.check_errors, check_errors);
    }
    /* a check without fix never writes */
    assert_int_equal(stat(img, &after), 0);
    assert_int_equal(before.st_size, after.st_size);
    {
        FILE *f = fopen(img, "rb");
        uint8_t *now = malloc((size_t)after.st_size + 1);
        assert_non_null(now);
        assert_int_equal(fread(now, 1, (size_t)after.st_size, f), (size_t)after.st_size);
        fclose(f);
        assert_memory_equal(copy_before, now, (size_t)after.st_size);
        free(now);
    }
    free(copy_before);
    if (have_qemu) {
        assert_true(qemu_check(NULL, &q));
        assert_counts_equal(&m, &q);
        assert_int_equal(m.image_end_offset, q.image_end_offset);
    }
}

/* Repair a copy with qemu-img and the original with us; both must end up equally clean. */
static void repair_expect(int fix, const char *qemu_mode, int corruptions_fixed, int leaks_fixed,
                          int remaining_corruptions, int remaining_leaks)
{
    static char qcopy[112];
    snprintf(qcopy, sizeof(qcopy), "%s.q", img_buf);
    assert_int_equal(run("cp %s %s", img, qcopy), 0);

    Counts m;
    VdError *err = NULL;
    int ret = my_check(fix, &m, &err);
    if (ret < 0) {
        fail_msg("repair failed: %s", vd_error_msg(err));
    }
    if (getenv("QCHECK_LEARN")) {
        fprintf(stderr, "LEARN repair %d %d %d %d\n", m.corruptions_fixed, m.leaks_fixed,
                m.corruptions, m.leaks);
        unlink(qcopy);
        return;
    }
    assert_int_equal(m.corruptions_fixed, corruptions_fixed);
    assert_int_equal(m.leaks_fixed, leaks_fixed);
    assert_int_equal(m.corruptions, remaining_corruptions);
    assert_int_equal(m.leaks, remaining_leaks);
    assert_int_equal(m.check_errors, 0);

    if (have_qemu) {
        /* qemu-img agrees with what we say remains */
        Counts after;
        assert_true(qemu_check(NULL, &after));
        assert_int_equal(after.corruptions, remaining_corruptions);
        assert_int_equal(after.leaks, remaining_leaks);
        /* and qemu-img's own repair of the same damage reports the same */
        img = qcopy;
        Counts q;
        if (qemu_check(qemu_mode, &q)) {
            assert_int_equal(q.corruptions_fixed, corruptions_fixed);
            assert_int_equal(q.leaks_fixed, leaks_fixed);
            assert_int_equal(q.corruptions, remaining_corruptions);
            assert_int_equal(q.leaks, remaining_leaks);
        }
        img = img_buf;
    }
    unlink(qcopy);
}

/* ---- cases ---- */

static void test_clean(void **state)
{
    make_image("", "10M", "write 0 200k;write -c 1M 64k;write 5M 64k");
    check_expect(0, 0, 0);
    Counts m;
    assert_int_equal(my_check(0, &m, NULL), 0);
    assert_int_equal(m.total, 160);
    assert_int_equal(m.allocated, 6);
    assert_int_equal(m.compressed, 1);
    assert_int_equal(m.fragmented, 2);
    /* repair of a clean image changes nothing */
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 0, 0, 0, 0);
}

static void test_leak(void **state)
{
    make_image("", "10M", "write 0 200k");
    set_refcount(data_cluster(0), 2);
    check_expect(1, 1, 0); /* the leak, and OFLAG_COPIED set on a cluster with refcount 2 */
    repair_expect(VD_FIX_LEAKS, "leaks", 0, 1, 0, 0);
}

static void test_leaks_past_eof_and_many(void **state)
{
    make_image("", "10M", "write 0 4M");
    struct stat st;
    assert_int_equal(stat(img, &st), 0);
    uint64_t eof_cluster = (uint64_t)st.st_size >> cluster_bits();
    /* refcounts of clusters past EOF are not looked at (as qemu-img) */
    set_refcount(eof_cluster + 1, 1);
    for (uint64_t k = 8; k < 40; k++) {
        set_refcount(k, 2);
    }
    check_expect(32, 32, 0); /* each leaked data cluster also disagrees with OFLAG_COPIED */
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 0, 32, 0, 0);
}

static void test_corruption_needs_rebuild(void **state)
{
    make_image("", "10M", "write 0 200k");
    set_refcount(data_cluster(1), 0);
    check_expect(2, 0, 0); /* refcount 0 < 1, plus the data cluster's OFLAG_COPIED */
    /* fixing only leaks cannot help: the refcount structure must be rebuilt */
    Counts m;
    VdError *err = NULL;
    assert_int_equal(my_check(VD_FIX_LEAKS, &m, &err), -EIO);
    vd_error_free(err);
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 1, 0, 0, 0);
}

static void test_refcount_too_low(void **state)
{
    make_image("", "10M", "write 0 200k");
    assert_int_equal(run("qemu-img snapshot -c s1 %s", img), 0);
    set_refcount(data_cluster(1), 1); /* shared with the snapshot: should be 2 */
    check_expect(2, 0, 0);            /* refcount, and OFLAG_COPIED now disagrees */
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 1, 0, 0, 0);
}

static void test_oflag_copied(void **state)
{
    make_image("", "10M", "write 0 200k");
    uint64_t a = l2_entry_addr(0, 2);
    wr64(a, rd64(a) & ~QCOW2_OFLAG_COPIED);
    wr64(l1_offset(), rd64(l1_offset()) & ~QCOW2_OFLAG_COPIED);
    check_expect(2, 0, 0);
    /* -r leaks repairs flags too when nothing else is wrong (as qemu-img) */
    repair_expect(VD_FIX_LEAKS, "leaks", 2, 0, 0, 0);
}

static void test_l2_out_of_range(void **state)
{
    make_image("", "10M", "write 0 200k");
    wr64(l2_entry_addr(0, 3), QCOW2_OFLAG_COPIED | (1ULL << 40));
    /* past-EOF reference, the replaced cluster leaks, its OFLAG_COPIED vs refcount 0 */
    check_expect(2, 1, 0);
    /* the past-EOF reference is not repairable (qemu-img neither) */
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 1, 1, 1, 0);
}

static void test_l2_misaligned(void **state)
{
    make_image("", "10M", "write 0 200k");
    uint64_t a = l2_entry_addr(0, 1);
    wr64(a, rd64(a) + 0x200);
    check_expect(2, 0, 0); /* misaligned, and the refcount=1 cluster now has 2 references */
}

static void test_prealloc_zero_misaligned(void **state)
{
    make_image("", "10M", "write 0 200k;write -z 0 64k");
    uint64_t a = l2_entry_addr(0, 0);
    assert_true(rd64(a) & QCOW2_OFLAG_ZERO);
    wr64(a, rd64(a) + 0x200);
    check_expect(2, 0, 0);
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 1, 1, 0, 0);
}

static void test_refblock_zeroed(void **state)
{
    make_image("", "10M", "write 0 200k");
    uint64_t rb = rd64(reftable_offset());
    uint8_t z[16] = { 0 };
    wr(rb, z, sizeof(z));
    check_expect(12, 0, 0); /* 8 refcounts, 4 OFLAG_COPIED */
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 8, 0, 0, 0);
}

static void test_refcount_widths(void **state)
{
    make_image("refcount_bits=1", "10M", "write 0 200k");
    check_expect(0, 0, 0);
    make_image("refcount_bits=64", "10M", "write 0 200k");
    set_refcount(3, 5);
    check_expect(0, 1, 0);
    repair_expect(VD_FIX_LEAKS, "leaks", 0, 1, 0, 0);
    make_image("refcount_bits=8", "10M", "write 0 200k");
    set_refcount(data_cluster(0), 0);
    check_expect(2, 0, 0);
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 1, 0, 0, 0);
}

static void test_extended_l2(void **state)
{
    make_image("extended_l2=on", "10M",
               "write 0 200k;write 1M 4k;write -c 2M 64k;write -z 3M 32k");
    check_expect(0, 0, 0);
    wr64(l2_entry_addr(0, 0) + 8, 0xffffffffffffffffULL); /* alloc and zero bits both set */
    wr64(l2_entry_addr(0, 10) + 8, 1);                    /* unallocated, but alloc bit set */
    check_expect(2, 0, 0);
}

static void test_snapshots_and_bitmaps(void **state)
{
    make_image("", "10M", "write 0 200k");
    assert_int_equal(run("qemu-img snapshot -c s1 %s", img), 0);
    assert_int_equal(run("qemu-io -c 'write 64k 64k' %s", img), 0);
    assert_int_equal(run("qemu-img snapshot -c s2 %s", img), 0);
    assert_int_equal(run("qemu-img bitmap --add %s b0", img), 0);
    assert_int_equal(run("qemu-img bitmap --add -g 4096 %s b1", img), 0);
    assert_int_equal(run("qemu-io -c 'write 1M 64k' %s", img), 0);
    check_expect(0, 0, 0);
    /* snapshot L1 table misaligned */
    uint64_t so = rd64(64);
    wr64(so, rd64(so) + 512);
    check_expect(1, 6, 0); /* the snapshot's L1 and L2 tables and its own data leak */
}

/* Make snapshot entry 0 "incomplete": keep only 8 bytes of its extra data (v3 needs 16). */
static void truncate_snapshot_extra(void)
{
    uint32_t nb = rd32(60);
    uint64_t so = rd64(64);
    assert_true(nb >= 1);
    uint8_t buf[4096] = { 0 };
    int fd = open(img, O_RDWR);
    assert_true(fd >= 0);
    ssize_t got = pread(fd, buf, sizeof(buf), (off_t)so); /* the table may end the file */
    assert_true(got >= 40);
    uint32_t extra = qcow2_be32(buf + 36);
    uint16_t ids = (uint16_t)((buf[12] << 8) | buf[13]);
    uint16_t names = (uint16_t)((buf[14] << 8) | buf[15]);
    assert_true(extra >= 16 && 40 + extra + ids + names < sizeof(buf));
    memmove(buf + 48, buf + 40 + extra, (size_t)ids + names);
    qcow2_put_be32(buf + 36, 8);
    /* pad the shortened entry with zeroes up to the next 8-byte boundary, keep the rest */
    size_t new_len = (48 + ids + names + 7) & ~7u;
    size_t old_len = (40 + extra + ids + names + 7) & ~7u;
    memset(buf + 48 + ids + names, 0, new_len - (48 + ids + names));
    memmove(buf + new_len, buf + old_len, sizeof(buf) - old_len);
    assert_int_equal(pwrite(fd, buf, (size_t)got, (off_t)so), got);
    close(fd);
}

static void test_snapshot_table_repair(void **state)
{
    make_image("", "10M", "write 0 200k");
    assert_int_equal(run("qemu-img snapshot -c s1 %s", img), 0);
    truncate_snapshot_extra();
    check_expect(1, 0, 0);
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 1, 0, 0, 0);
    /* the repaired entry is complete again and the snapshot is still usable */
    assert_int_equal(run("qemu-img snapshot -l %s | grep -q s1", img), 0);
    uint8_t h[40];
    int fd = open(img, O_RDONLY);
    assert_int_equal(pread(fd, h, 40, (off_t)rd64(64)), 40);
    close(fd);
    assert_true(qcow2_be32(h + 36) >= 16);

    /* too much extra data: an error without repair, dropped with repair */
    make_image("", "10M", "write 0 200k");
    assert_int_equal(run("qemu-img snapshot -c s1 %s", img), 0);
    wr32(rd64(64) + 36, 5000);
    Counts m;
    VdError *err = NULL;
    assert_int_equal(my_check(0, &m, &err), -EFBIG);
    assert_int_equal(m.check_errors, 1);
    vd_error_free(err);
}

static void test_v2_and_cluster_sizes(void **state)
{
    make_image("compat=0.10", "10M", "write 0 200k");
    set_refcount((rd64(l1_offset()) & QCOW2_L1E_OFFSET_MASK) >> cluster_bits(), 3);
    check_expect(1, 1, 0);
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 0, 1, 0, 0);
    make_image("cluster_size=512", "4M", "write 0 200k;write -c 1M 4k");
    check_expect(0, 0, 0);
    make_image("cluster_size=2M", "100M", "write 0 200k;write 50M 4M");
    check_expect(0, 0, 0);
}

static void test_data_file_and_luks(void **state)
{
    /* external data file: data clusters are not refcounted in the qcow2 file */
    char opts[160];
    snprintf(opts, sizeof(opts), "data_file=%s/t.raw", tmpdir);
    make_image(opts, "10M", "write 0 200k");
    check_expect(0, 0, 0);
    /* LUKS: the crypto header area is refcounted (no qemu-img comparison: it needs the key) */
    unlink(img);
    /*
     * qemu-img calibrates PBKDF iterations from CPU time; a tiny iter-time sometimes measures 0
     * and fails ("Unable to get accurate CPU usage"), so give it 200 ms and a second chance.
     */
    int rc = 1;
    for (int attempt = 0; attempt < 3 && rc != 0; attempt++) {
        rc = run("qemu-img create --object secret,id=s0,data=123456 -f qcow2 -o "
                 "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=200 %s 10M", img);
    }
    assert_int_equal(rc, 0);
    Counts m;
    assert_int_equal(my_check(0, &m, NULL), 0);
    assert_int_equal(m.corruptions, 0);
    assert_int_equal(m.leaks, 0);
    assert_int_equal(m.check_errors, 0);
}

static void test_garbage_headers(void **state)
{
    struct { uint64_t off; int width; uint64_t val; } cases[] = {
        { 0, 4, 0x12345678 },   /* magic */
        { 4, 4, 4 },            /* version */
        { 20, 4, 30 },          /* cluster_bits */
        { 20, 4, 8 },           /* cluster_bits */
        { 36, 4, 0x7fffffff },  /* l1_size */
        { 40, 8, 0x10200 },     /* l1 offset misaligned */
        { 56, 4, 0x7fffffff },  /* refcount_table_clusters */
        { 96, 4, 7 },           /* refcount_order */
        { 100, 4, 50 },         /* header_length */
        { 72, 8, 1ULL << 40 },  /* unknown incompatible feature */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        make_image("", "10M", "write 0 64k");
        if (cases[i].width == 4) {
            wr32(cases[i].off, (uint32_t)cases[i].val);
        } else {
            wr64(cases[i].off, cases[i].val);
        }
        Counts m;
        VdError *err = NULL;
        int ret = my_check(0, &m, &err);
        assert_true(ret == -EINVAL || ret == -ENOTSUP);
        assert_non_null(err);
        vd_error_free(err);
    }
    /* a file shorter than a header */
    make_image("", "10M", "");
    assert_int_equal(truncate(img, 40), 0);
    Counts m;
    VdError *err = NULL;
    assert_int_equal(my_check(0, &m, &err), -EINVAL);
    vd_error_free(err);
}

static void test_tables_outside_file(void **state)
{
    /* As qemu-img: tables past EOF read as zeroes and are reported as corruptions. */
    make_image("", "10M", "write 0 64k");
    wr64(40, 1ULL << 30);
    check_expect(1, 3, 0);
    make_image("", "10M", "write 0 512k");
    assert_int_equal(truncate(img, 65536 * 4), 0);
    check_expect(1, 0, 0);
    Counts q;
    if (have_qemu) {
        assert_true(qemu_check(NULL, &q));
    }
}

static void test_dirty_lazy_refcounts(void **state)
{
    make_image("lazy_refcounts=on", "10M", "");
    /* qemu-io aborts without flushing: the image stays dirty with refcounts missing */
    run("qemu-io -c 'write 0 200k' -c abort %s", img);
    assert_true(rd64(72) & QCOW2_INCOMPAT_DIRTY);
    check_expect(8, 0, 0); /* 4 refcounts missing, 4 OFLAG_COPIED */
    repair_expect(VD_FIX_LEAKS | VD_FIX_ERRORS, "all", 4, 0, 0, 0);
    assert_false(rd64(72) & QCOW2_INCOMPAT_DIRTY);
}

/* Flip bytes in the metadata of a small image: the checker must return, never crash or hang. */
static void test_fuzz(void **state)
{
    make_image("cluster_size=4096", "1M", "write 0 64k;write -c 256k 8k");
    assert_int_equal(run("qemu-img snapshot -c s1 %s", img), 0);
    char pristine[112];
    snprintf(pristine, sizeof(pristine), "%s.orig", img);
    assert_int_equal(run("cp %s %s", img, pristine), 0);
    struct stat st;
    assert_int_equal(stat(img, &st), 0);
    srand(1234);
    for (int iter = 0; iter < 150; iter++) {
        assert_int_equal(run("cp %s %s", pristine, img), 0);
        for (int k = 0; k < 4; k++) {
            /* bias towards the header and early metadata clusters */
            uint64_t off = (rand() % 3 == 0) ? (uint64_t)(rand() % 112)
                                             : (uint64_t)rand() % (uint64_t)st.st_size;
            uint8_t b = (uint8_t)rand();
            wr(off, &b, 1);
        }
        Counts m;
        VdError *err = NULL;
        int fix = (iter % 3 == 2) ? (VD_FIX_LEAKS | VD_FIX_ERRORS) : 0;
        my_check(fix, &m, &err);
        vd_error_free(err);
    }
    unlink(pristine);
}

static void test_measure(void **state)
{
    struct {
        uint64_t size, cluster;
        int refbits;
        bool extl2;
        VdPrealloc prealloc;
        uint64_t required, full; /* qemu-img measure 7.2 */
    } cases[] = {
        { 1ULL << 30, 0, 0, false, VD_PREALLOC_OFF, 393216, 1074135040 },
        { 10ULL << 30, 0, 0, false, VD_PREALLOC_OFF, 1900544, 10739318784ULL },
        { 1ULL << 30, 4096, 1, false, VD_PREALLOC_OFF, 2146304, 1075888128 },
        { 1ULL << 30, 2ULL << 20, 64, false, VD_PREALLOC_OFF, 10485760, 1084227584 },
        { 100ULL << 20, 0, 0, true, VD_PREALLOC_OFF, 327680, 105185280 },
        { 100ULL << 20, 0, 0, false, VD_PREALLOC_FULL, 105185280, 105185280 },
        { 12345, 512, 16, false, VD_PREALLOC_OFF, 2560, 15360 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        VdCreateOptions o = { .format = "qcow2", .size = cases[i].size, .size_given = true,
                              .cluster_size = cases[i].cluster, .refcount_bits = cases[i].refbits,
                              .extended_l2 = cases[i].extl2, .prealloc = cases[i].prealloc };
        uint64_t req = 0, full = 0;
        VdError *err = NULL;
        assert_int_equal(qcow2_measure(&o, NULL, &req, &full, &err), 0);
        assert_int_equal(req, cases[i].required);
        assert_int_equal(full, cases[i].full);
    }
    /* invalid options */
    VdCreateOptions bad = { .format = "qcow2", .size = 1 << 20, .cluster_size = 1000 };
    uint64_t req, full;
    VdError *err = NULL;
    assert_int_equal(qcow2_measure(&bad, NULL, &req, &full, &err), -EINVAL);
    vd_error_free(err);
    err = NULL;
    VdCreateOptions bad2 = { .format = "qcow2", .size = 1 << 20, .compat = "0.10",
                             .refcount_bits = 8 };
    assert_int_equal(qcow2_measure(&bad2, NULL, &req, &full, &err), -EINVAL);
    vd_error_free(err);

    /* with a source: a raw file with 2 data extents, compared with qemu-img measure */
    char raw[160];
    snprintf(raw, sizeof(raw), "%s/src.raw", tmpdir);
    unlink(raw);
    assert_int_equal(run("qemu-img create -f raw %s 64M", raw), 0);
    assert_int_equal(run("qemu-io -f raw -c 'write 0 100k' -c 'write 32M 1M' %s", raw), 0);
    err = NULL;
    BlockNode *src = vd_open_image(raw, "raw", 0, &err);
    if (!src) {
        fail_msg("open raw: %s", vd_error_msg(err));
    }
    VdCreateOptions o = { .format = "qcow2" };
    assert_int_equal(qcow2_measure(&o, src, &req, &full, &err), 0);
    vd_node_unref(src);
    if (have_qemu) {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "qemu-img measure --output=json -O qcow2 -f raw %s", raw);
        FILE *p = popen(cmd, "r");
        char buf[1024];
        size_t n = fread(buf, 1, sizeof(buf) - 1, p);
        buf[n] = 0;
        pclose(p);
        json_t *j = json_loads(buf, 0, NULL);
        assert_non_null(j);
        assert_int_equal(req, json_integer_value(json_object_get(j, "required")));
        assert_int_equal(full, json_integer_value(json_object_get(j, "fully-allocated")));
        json_decref(j);
    }
    unlink(raw);
}

static int setup(void **state)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/vd-qcheck-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        return -1;
    }
    snprintf(img_buf, sizeof(img_buf), "%s/t.qcow2", tmpdir);
    have_qemu = run("qemu-img --version") == 0 && run("qemu-io --version") == 0;
    return 0;
}

static int teardown(void **state)
{
    run("rm -rf %s", tmpdir);
    return 0;
}

int main(void)
{
    if (run("qemu-img --version") != 0 || run("qemu-io --version") != 0) {
        fprintf(stderr, "qemu-img/qemu-io not installed: skipping (images are made with them)\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clean),
        cmocka_unit_test(test_leak),
        cmocka_unit_test(test_leaks_past_eof_and_many),
        cmocka_unit_test(test_corruption_needs_rebuild),
        cmocka_unit_test(test_refcount_too_low),
        cmocka_unit_test(test_oflag_copied),
        cmocka_unit_test(test_l2_out_of_range),
        cmocka_unit_test(test_l2_misaligned),
        cmocka_unit_test(test_prealloc_zero_misaligned),
        cmocka_unit_test(test_refblock_zeroed),
        cmocka_unit_test(test_refcount_widths),
        cmocka_unit_test(test_extended_l2),
        cmocka_unit_test(test_snapshots_and_bitmaps),
        cmocka_unit_test(test_snapshot_table_repair),
        cmocka_unit_test(test_v2_and_cluster_sizes),
        cmocka_unit_test(test_data_file_and_luks),
        cmocka_unit_test(test_garbage_headers),
        cmocka_unit_test(test_tables_outside_file),
        cmocka_unit_test(test_dirty_lazy_refcounts),
        cmocka_unit_test(test_fuzz),
        cmocka_unit_test(test_measure),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
