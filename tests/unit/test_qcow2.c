/*
 * test_qcow2.c - unit tests of the qcow2 driver: layout of created images, mapping and block
 * status, allocation / free / reuse, refcount widths and table growth, metadata cache eviction,
 * zero / discard semantics, compressed round trips, COW from backing, damaged headers, threads.
 * qemu-img (when installed) is the oracle for consistency: images must check clean.
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
#include <pthread.h>

#include <cmocka.h>
#include <jansson.h>

#include "block/block.h"
#include "formats/qcow2.h"
#include "util/lock.h"

static char tmpdir[64];

static const char *path(const char *name)
{
    static char buf[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(buf[i], sizeof(buf[i]), "%s/%s", tmpdir, name);
    return buf[i];
}

static bool have_qemu_img(void)
{
    return system("qemu-img --version >/dev/null 2>&1") == 0;
}

/* qemu-img check must find no leak and no corruption. */
static void assert_clean(const char *file)
{
    if (!have_qemu_img()) {
        return;
    }
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s'", file);
    assert_int_equal(system(cmd), 0);
}

static BlockNode *create_open(const char *name, uint64_t size, uint64_t cs, int rbits,
                              const char *compat, bool extl2, const char *ctype,
                              const char *backing)
{
    VdCreateOptions o;
    memset(&o, 0, sizeof(o));
    o.format = "qcow2";
    o.size = size;
    o.size_given = true;
    o.cluster_size = cs;
    o.refcount_bits = rbits;
    o.compat = compat;
    o.extended_l2 = extl2;
    o.compression_type = ctype;
    o.backing_file = backing;
    o.backing_fmt = backing ? "qcow2" : NULL;
    VdError *err = NULL;
    int ret = vd_drv_qcow2.create(path(name), &o, &err);
    if (ret < 0) {
        fprintf(stderr, "create: %s\n", vd_error_msg(err));
    }
    assert_int_equal(ret, 0);
    BlockNode *bs = vd_open_image(path(name), "qcow2", VD_OPEN_RDWR, &err);
    if (!bs) {
        fprintf(stderr, "open: %s\n", vd_error_msg(err));
    }
    assert_non_null(bs);
    return bs;
}

static void fill(uint8_t *b, uint64_t n, uint8_t v)
{
    memset(b, v, n);
}

static void assert_reads(BlockNode *bs, uint64_t off, uint64_t n, uint8_t v)
{
    uint8_t *b = malloc(n);
    assert_non_null(b);
    assert_int_equal(vd_pread(bs, off, n, b), 0);
    for (uint64_t i = 0; i < n; i++) {
        if (b[i] != v) {
            fprintf(stderr, "byte %llu: %02x != %02x\n", (unsigned long long)(off + i), b[i], v);
            fail();
        }
    }
    free(b);
}

static void write_pat(BlockNode *bs, uint64_t off, uint64_t n, uint8_t v)
{
    uint8_t *b = malloc(n);
    assert_non_null(b);
    fill(b, n, v);
    assert_int_equal(vd_pwrite(bs, off, n, b, 0), 0);
    free(b);
}

static int status(BlockNode *bs, uint64_t off, uint64_t n, uint64_t *pnum, uint64_t *map)
{
    uint64_t m = 0;
    BlockNode *f = NULL;
    int flags = vd_drv_qcow2.block_status(bs, off, n, pnum, &m, &f);
    if (flags >= 0 && (flags & VD_BS_OFFSET_VALID)) {
        assert_ptr_equal(f, bs->file);
    }
    if (map) {
        *map = m;
    }
    return flags;
}

static void test_create_layout(void **state)
{
    BlockNode *bs = create_open("layout.qcow2", 1ULL << 30, 0, 0, NULL, false, NULL, NULL);
    Qcow2State *s = q2_state(bs);
    assert_int_equal(s->h.version, 3);
    assert_int_equal(s->cluster_size, 65536);
    assert_int_equal(s->reftable_offset, 65536);
    assert_int_equal(s->reftable[0], 2 * 65536);
    assert_int_equal(s->l1_offset, 3 * 65536);
    assert_int_equal(s->l1_size, 2);
    assert_int_equal(s->refcount_order, 4);
    /* the feature table is written like qemu-img does */
    bool found = false;
    for (int i = 0; i < s->nb_exts; i++) {
        found |= s->exts[i].type == QCOW2_EXT_FEATURE_TABLE;
    }
    assert_true(found);
    uint64_t rc;
    for (uint64_t c = 0; c < 4; c++) {
        assert_int_equal(q2_get_refcount(s, c, &rc), 0);
        assert_int_equal(rc, 1);
    }
    assert_int_equal(q2_get_refcount(s, 4, &rc), 0);
    assert_int_equal(rc, 0);
    vd_node_unref(bs);
    assert_clean(path("layout.qcow2"));
}

static void test_mapping_and_status(void **state)
{
    BlockNode *bs = create_open("map.qcow2", 64 << 20, 0, 0, NULL, false, NULL, NULL);
    write_pat(bs, 0, 4 << 20, 0x11);           /* 64 contiguous clusters */
    write_pat(bs, (8 << 20) + 100, 1000, 0x22); /* partial cluster: rest must read zero */
    assert_reads(bs, 0, 4 << 20, 0x11);
    assert_reads(bs, 8 << 20, 100, 0);
    assert_reads(bs, (8 << 20) + 100, 1000, 0x22);
    assert_reads(bs, (8 << 20) + 1100, 65536 - 1100, 0);

    uint64_t pnum, map;
    int f = status(bs, 0, 64 << 20, &pnum, &map);
    assert_int_equal(f, VD_BS_DATA | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID);
    assert_int_equal(pnum, 4 << 20); /* one merged extent */
    uint8_t raw[16];
    assert_int_equal(vd_pread(bs->file, map, 16, raw), 0);
    assert_int_equal(raw[0], 0x11);
    f = status(bs, 4 << 20, 60 << 20, &pnum, &map);
    assert_int_equal(f, 0);
    assert_int_equal(pnum, 4 << 20);
    vd_node_unref(bs);
    assert_clean(path("map.qcow2"));
}

static void test_alloc_free_reuse(void **state)
{
    BlockNode *bs = create_open("reuse.qcow2", 16 << 20, 0, 0, NULL, false, NULL, NULL);
    uint64_t pnum, map1, map2, map3;
    write_pat(bs, 0, 65536, 1);
    write_pat(bs, 65536, 65536, 2);
    assert_int_equal(status(bs, 0, 65536, &pnum, &map1) & VD_BS_OFFSET_VALID, VD_BS_OFFSET_VALID);
    assert_int_equal(vd_pdiscard(bs, 0, 65536, VD_REQ_FULL_DISCARD), 0);
    assert_int_equal(status(bs, 0, 65536, &pnum, NULL), 0);
    assert_reads(bs, 0, 65536, 0);
    /* the freed host cluster is handed out again */
    write_pat(bs, 5 << 20, 65536, 3);
    status(bs, 5 << 20, 65536, &pnum, &map2);
    assert_int_equal(map2, map1);
    /* overwrite in place keeps the mapping */
    write_pat(bs, (5 << 20) + 10, 10, 4);
    status(bs, 5 << 20, 65536, &pnum, &map3);
    assert_int_equal(map3, map2);
    assert_reads(bs, 5 << 20, 10, 3);
    assert_reads(bs, (5 << 20) + 10, 10, 4);
    assert_reads(bs, 65536, 65536, 2);
    Qcow2State *s = q2_state(bs);
    uint64_t rc;
    assert_int_equal(q2_get_refcount(s, map2 >> 16, &rc), 0);
    assert_int_equal(rc, 1);
    vd_node_unref(bs);
    assert_clean(path("reuse.qcow2"));
}

static void test_refblock_entries(void **state)
{
    Qcow2State s;
    uint8_t rb[512];
    memset(&s, 0, sizeof(s));
    for (unsigned order = 0; order <= 6; order++) {
        s.refcount_order = order;
        uint64_t max = order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1;
        uint64_t n = 512 * 8 >> order;
        memset(rb, 0, sizeof(rb));
        for (uint64_t i = 0; i < n; i++) {
            q2_refblock_set(&s, rb, i, (i * 7 + 3) & max);
        }
        for (uint64_t i = 0; i < n; i++) {
            assert_int_equal(q2_refblock_get(&s, rb, i), (i * 7 + 3) & max);
        }
        q2_refblock_set(&s, rb, 1, max);
        assert_int_equal(q2_refblock_get(&s, rb, 1), max);
        assert_int_equal(q2_refblock_get(&s, rb, 0), 3 & max);
        assert_int_equal(q2_refblock_get(&s, rb, 2), 17 & max);
    }
    /* sub-byte layout is LSB first (as qemu) */
    s.refcount_order = 0;
    memset(rb, 0, sizeof(rb));
    q2_refblock_set(&s, rb, 1, 1);
    assert_int_equal(rb[0], 2);
    s.refcount_order = 4;
    q2_refblock_set(&s, rb, 0, 0x1234);
    assert_int_equal(rb[0], 0x12);
    assert_int_equal(rb[1], 0x34);
}

static void test_refcount_widths_growth(void **state)
{
    /* 512-byte clusters: small refcount blocks and table, so both must grow */
    int widths[] = { 1, 2, 4, 8, 16, 32, 64 };
    for (size_t i = 0; i < sizeof(widths) / sizeof(widths[0]); i++) {
        char name[32];
        snprintf(name, sizeof(name), "rc%d.qcow2", widths[i]);
        BlockNode *bs = create_open(name, 8 << 20, 512, widths[i], NULL, false, NULL, NULL);
        Qcow2State *s = q2_state(bs);
        uint64_t rt0 = s->reftable_size;
        write_pat(bs, 0, 3 << 20, (uint8_t)widths[i]);
        assert_int_equal(vd_pdiscard(bs, 1 << 20, 1 << 20, VD_REQ_FULL_DISCARD), 0);
        write_pat(bs, 6 << 20, 512 << 10, 0x5a);
        if (widths[i] == 64) {
            assert_true(s->reftable_size > rt0);
        }
        assert_int_equal(vd_flush(bs), 0);
        assert_reads(bs, 0, 1 << 20, (uint8_t)widths[i]);
        assert_reads(bs, 1 << 20, 1 << 20, 0);
        assert_reads(bs, 2 << 20, 1 << 20, (uint8_t)widths[i]);
        assert_reads(bs, 6 << 20, 512 << 10, 0x5a);
        vd_node_unref(bs);
        assert_clean(path(name));
    }
}

static void test_cache_eviction(void **state)
{
    /* 4 KiB clusters: one L2 table maps 2 MiB; a 2-entry cache must evict constantly */
    BlockNode *bs = create_open("evict.qcow2", 64 << 20, 4096, 0, NULL, false, NULL, NULL);
    Qcow2State *s = q2_state(bs);
    vd_mutex_lock(&s->lock);
    assert_int_equal(q2_flush_all(s), 0);
    q2_cache_destroy(&s->l2_cache);
    assert_int_equal(q2_cache_init(&s->l2_cache, 2, s->cluster_size, true), 0);
    q2_cache_destroy(&s->rb_cache);
    assert_int_equal(q2_cache_init(&s->rb_cache, 2, s->cluster_size, false), 0);
    vd_mutex_unlock(&s->lock);
    for (int i = 0; i < 20; i++) {
        write_pat(bs, (uint64_t)i * (3 << 20) % (64 << 20) + 4096 * i, 5000, (uint8_t)(i + 1));
    }
    for (int i = 0; i < 20; i++) {
        assert_reads(bs, (uint64_t)i * (3 << 20) % (64 << 20) + 4096 * i, 5000, (uint8_t)(i + 1));
    }
    vd_node_unref(bs);
    /* reopened with a normal cache, the evicted tables were written back */
    VdError *err = NULL;
    bs = vd_open_image(path("evict.qcow2"), "qcow2", 0, &err);
    assert_non_null(bs);
    for (int i = 0; i < 20; i++) {
        assert_reads(bs, (uint64_t)i * (3 << 20) % (64 << 20) + 4096 * i, 5000, (uint8_t)(i + 1));
    }
    vd_node_unref(bs);
    assert_clean(path("evict.qcow2"));
}

static void test_zero_discard(void **state)
{
    BlockNode *bs = create_open("zero.qcow2", 16 << 20, 0, 0, NULL, false, NULL, NULL);
    uint64_t pnum, map, map2;
    write_pat(bs, 0, 1 << 20, 0x77);
    status(bs, 0, 65536, &pnum, &map);
    /* keep allocation: zero flag on the same host cluster */
    assert_int_equal(vd_pwrite_zeroes(bs, 0, 65536, 0), 0);
    assert_int_equal(status(bs, 0, 65536, &pnum, &map2),
                     VD_BS_ZERO | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID);
    assert_int_equal(map2, map);
    assert_reads(bs, 0, 65536, 0);
    /* may unmap: plain zero cluster */
    assert_int_equal(vd_pwrite_zeroes(bs, 65536, 131072, VD_REQ_MAY_UNMAP), 0);
    assert_int_equal(status(bs, 65536, 131072, &pnum, NULL), VD_BS_ZERO | VD_BS_ALLOCATED);
    assert_int_equal(pnum, 131072);
    /* partial cluster cannot be done in metadata */
    assert_int_equal(vd_pwrite_zeroes(bs, 300000, 100, VD_REQ_NO_FALLBACK), -ENOTSUP);
    assert_int_equal(vd_pwrite_zeroes(bs, 300000, 100, 0), 0);
    assert_reads(bs, 300000, 100, 0);
    assert_reads(bs, 300100, 100, 0x77);
    /* writing into a zero cluster with a kept host cluster rewrites it fully */
    write_pat(bs, 100, 10, 0x12);
    assert_reads(bs, 0, 100, 0);
    assert_reads(bs, 100, 10, 0x12);
    assert_reads(bs, 110, 65536 - 110, 0);
    /* discard without backing: unallocated */
    assert_int_equal(vd_pdiscard(bs, 512 << 10, 512 << 10, 0), 0);
    assert_int_equal(status(bs, 512 << 10, 512 << 10, &pnum, NULL), 0);
    assert_reads(bs, 512 << 10, 512 << 10, 0);
    vd_node_unref(bs);
    assert_clean(path("zero.qcow2"));

    /* v2: no zero flag; without backing zeroes may deallocate */
    bs = create_open("zero2.qcow2", 4 << 20, 0, 0, "0.10", false, NULL, NULL);
    write_pat(bs, 0, 1 << 20, 0x33);
    assert_int_equal(vd_pwrite_zeroes(bs, 0, 65536, VD_REQ_MAY_UNMAP), 0);
    assert_int_equal(status(bs, 0, 65536, &pnum, NULL), 0);
    /* as QEMU's: even without unmap (and so without fallback), dropped */
    assert_int_equal(vd_pwrite_zeroes(bs, 65536, 65536, VD_REQ_NO_FALLBACK), 0);
    assert_int_equal(status(bs, 65536, 65536, &pnum, NULL), 0);
    assert_reads(bs, 0, 131072, 0);
    assert_reads(bs, 131072, 65536, 0x33);
    vd_node_unref(bs);
    assert_clean(path("zero2.qcow2"));
}

static void compressed_roundtrip(const char *name, const char *ctype, uint64_t cs)
{
    BlockNode *bs = create_open(name, 4 << 20, cs, 0, NULL, false, ctype, NULL);
    uint64_t n = 4 * cs;
    uint8_t *b = malloc(n), *r = malloc(n);
    assert_non_null(b);
    assert_non_null(r);
    for (uint64_t i = 0; i < n; i++) {
        b[i] = (uint8_t)((i / 100) ^ (i % 7));
    }
    assert_int_equal(vd_pwrite_compressed(bs, 0, n, b), 0);
    uint64_t pnum;
    assert_int_equal(status(bs, 0, n, &pnum, NULL), VD_BS_DATA | VD_BS_ALLOCATED);
    assert_int_equal(pnum, n);
    assert_int_equal(vd_pread(bs, 0, n, r), 0);
    assert_memory_equal(b, r, n);
    /* incompressible data is stored as a normal cluster */
    for (uint64_t i = 0; i < cs; i++) {
        b[i] = (uint8_t)rand();
    }
    assert_int_equal(vd_pwrite_compressed(bs, 8 * cs, cs, b), 0);
    assert_int_equal(status(bs, 8 * cs, cs, &pnum, NULL) & VD_BS_OFFSET_VALID,
                     VD_BS_OFFSET_VALID);
    assert_int_equal(vd_pread(bs, 8 * cs, cs, r), 0);
    assert_memory_equal(b, r, cs);
    /* partial overwrite of a compressed cluster: COW decompresses the rest */
    memset(b, 0xee, 10);
    assert_int_equal(vd_pwrite(bs, cs + 5, 10, b, 0), 0);
    assert_int_equal(vd_pread(bs, cs, cs, r), 0);
    assert_int_equal(r[4], (uint8_t)(((cs + 4) / 100) ^ ((cs + 4) % 7)));
    assert_int_equal(r[5], 0xee);
    assert_int_equal(r[15], (uint8_t)(((cs + 15) / 100) ^ ((cs + 15) % 7)));
    free(b);
    free(r);
    vd_node_unref(bs);
    assert_clean(path(name));
}

static void test_compressed(void **state)
{
    compressed_roundtrip("cz.qcow2", "zlib", 65536);
    compressed_roundtrip("cs.qcow2", "zstd", 65536);
    compressed_roundtrip("cz512.qcow2", "zlib", 512);
}

static void test_backing_cow(void **state)
{
    BlockNode *base = create_open("base.qcow2", 4 << 20, 0, 0, NULL, false, NULL, NULL);
    write_pat(base, 0, 4 << 20, 0x5b);
    vd_node_unref(base);
    const bool ext[] = { false, true };
    for (int i = 0; i < 2; i++) {
        const char *name = ext[i] ? "tope.qcow2" : "top.qcow2";
        BlockNode *top = create_open(name, 8 << 20, 0, 0, NULL, ext[i], NULL, path("base.qcow2"));
        assert_non_null(top->backing);
        write_pat(top, 1000, 100, 0x01);
        assert_reads(top, 0, 1000, 0x5b);
        assert_reads(top, 1000, 100, 0x01);
        assert_reads(top, 1100, (4 << 20) - 1100, 0x5b);
        assert_reads(top, 4 << 20, 4 << 20, 0); /* beyond the backing's end */
        uint64_t pnum;
        assert_int_equal(status(top, 65536, 65536, &pnum, NULL), 0);
        /* discard with a backing file: reads zero, not the backing data */
        assert_int_equal(vd_pdiscard(top, 131072, 65536, 0), 0);
        assert_reads(top, 131072, 65536, 0);
        vd_node_unref(top);
        assert_clean(path(name));
    }
}

static void patch(const char *file, long off, const void *data, size_t n)
{
    FILE *f = fopen(file, "r+b");
    assert_non_null(f);
    fseek(f, off, SEEK_SET);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void test_damaged_headers(void **state)
{
    struct {
        long off;
        uint8_t bytes[8];
        size_t n;
    } cases[] = {
        { 20, { 0, 0, 0, 30 }, 4 },                  /* cluster_bits */
        { 36, { 0x7f, 0xff, 0xff, 0xff }, 4 },       /* l1_size huge */
        { 36, { 0, 0, 0, 1 }, 4 },                   /* l1 too small for size */
        { 40, { 0, 0, 0, 0, 0, 0, 0x12, 0x34 }, 8 }, /* l1 offset unaligned */
        { 48, { 0, 0, 0, 0, 0, 1, 0, 1 }, 8 },       /* reftable unaligned */
        { 56, { 0, 0x10, 0, 0 }, 4 },                /* reftable huge */
        { 96, { 0, 0, 0, 7 }, 4 },                   /* refcount_order */
        { 100, { 0, 0, 0, 8 }, 4 },                  /* header_length */
        { 32, { 0, 0, 0, 1 }, 4 },                   /* encryption */
        { 72, { 0, 0, 0, 0, 0, 0, 0, 0x40 }, 8 },    /* unknown incompatible bit */
        { 0, { 'Q', 'F', 'I', 0 }, 4 },              /* magic */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        BlockNode *bs = create_open("dmg.qcow2", 1ULL << 30, 0, 0, NULL, false, NULL, NULL);
        vd_node_unref(bs);
        patch(path("dmg.qcow2"), cases[i].off, cases[i].bytes, cases[i].n);
        VdError *err = NULL;
        bs = vd_open_image(path("dmg.qcow2"), "qcow2", 0, &err);
        assert_null(bs);
        assert_non_null(err);
        vd_error_free(err);
    }
    /* a corrupt L1 entry: I/O error, no crash */
    BlockNode *bs = create_open("dmg.qcow2", 1 << 20, 0, 0, NULL, false, NULL, NULL);
    Qcow2State *s = q2_state(bs);
    uint64_t l1off = s->l1_offset;
    vd_node_unref(bs);
    uint8_t bad[8] = { 0x80, 0, 0, 0, 0, 0, 0x12, 0x00 };
    patch(path("dmg.qcow2"), (long)l1off, bad, 8);
    VdError *err = NULL;
    bs = vd_open_image(path("dmg.qcow2"), "qcow2", 0, &err);
    assert_non_null(bs);
    uint8_t b[512];
    assert_true(vd_pread(bs, 0, 512, b) < 0);
    vd_node_unref(bs);
}

/*
 * Tables outside the file (L1 / refcount table past EOF or at 0, snapshot table past EOF):
 * read-only and check opens succeed (as qemu-img info / check), I/O then fails with -EIO,
 * vd_check diagnoses the damage; a read-write open is refused.
 */
static void test_tables_outside_file(void **state)
{
    struct {
        long off;
        uint8_t bytes[12];
        size_t n;
        bool io_ok; /* only the snapshot table is damaged: guest I/O still works */
    } cases[] = {
        { 40, { 0, 0, 0, 1, 0, 0, 0, 0 }, 8, false }, /* L1 beyond EOF */
        { 40, { 0 }, 8, false },                      /* L1 at offset 0 */
        { 48, { 0, 0, 0, 1, 0, 0, 0, 0 }, 8, false }, /* refcount table beyond EOF */
        { 48, { 0 }, 8, false },                      /* refcount table at offset 0 */
        { 60, { 0, 0, 0, 5, 0, 0, 0x01, 0, 0, 0, 0, 0 }, 12, true }, /* snapshots past EOF */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        BlockNode *bs = create_open("tbl.qcow2", 1 << 20, 0, 0, NULL, false, NULL, NULL);
        uint8_t buf[4096];
        memset(buf, 0x5a, sizeof(buf));
        assert_int_equal(vd_pwrite(bs, 0, sizeof(buf), buf, 0), 0);
        vd_node_unref(bs);
        /* the snapshot case writes nb_snapshots = 5 and snapshots_offset = 1 << 40 */
        patch(path("tbl.qcow2"), cases[i].off, cases[i].bytes, cases[i].n);

        VdError *err = NULL;
        bs = vd_open_image(path("tbl.qcow2"), "qcow2", VD_OPEN_RDWR, &err);
        assert_null(bs);
        assert_non_null(err);
        vd_error_free(err);
        err = NULL;

        bs = vd_open_image(path("tbl.qcow2"), "qcow2", 0, &err);
        assert_non_null(bs);
        uint8_t rd[4096];
        uint64_t pnum;
        VdBlockStatus st;
        if (cases[i].io_ok) {
            assert_int_equal(vd_pread(bs, 0, sizeof(rd), rd), 0);
            assert_memory_equal(rd, buf, sizeof(rd));
        } else {
            assert_int_equal(vd_pread(bs, 0, sizeof(rd), rd), -EIO);
            assert_int_equal(vd_block_status(bs, 0, 4096, &pnum, &st), -EIO);
        }
        json_t *info = vd_image_info(bs, &err);
        assert_non_null(info);
        json_decref(info);
        vd_node_unref(bs);

        bs = vd_open_image(path("tbl.qcow2"), "qcow2", VD_OPEN_CHECK, &err);
        assert_non_null(bs);
        VdCheckResult res;
        assert_int_equal(vd_check(bs, &res, 0, &err), 0);
        assert_true(res.corruptions > 0 || res.leaks > 0);
        vd_check_result_clear(&res);
        vd_node_unref(bs);
    }
}

static uint64_t incompat_on_disk(const char *file)
{
    uint8_t b[8] = { 0 };
    FILE *f = fopen(file, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 72, SEEK_SET), 0);
    assert_int_equal(fread(b, 1, 8, f), 8);
    fclose(f);
    return qcow2_be64(b);
}

/*
 * Lazy refcounts: the first write sets the dirty bit on disk, new L2 tables no longer wait for
 * their refcounts, a clean close writes everything and clears the bit. Without the compat bit,
 * the dirty bit is never set.
 */
static void test_lazy_refcounts(void **state)
{
    for (int lazy = 0; lazy < 2; lazy++) {
        VdCreateOptions o;
        memset(&o, 0, sizeof(o));
        o.format = "qcow2";
        o.size = 256ULL << 20;
        o.size_given = true;
        o.cluster_size = 4096;
        o.lazy_refcounts = lazy;
        VdError *err = NULL;
        assert_int_equal(vd_drv_qcow2.create(path("lazy.qcow2"), &o, &err), 0);
        BlockNode *bs = vd_open_image(path("lazy.qcow2"), "qcow2", VD_OPEN_RDWR, &err);
        assert_non_null(bs);
        assert_int_equal(incompat_on_disk(path("lazy.qcow2")) & QCOW2_INCOMPAT_DIRTY, 0);
        for (int i = 0; i < 64; i++) {
            write_pat(bs, (uint64_t)i << 22, 4096, (uint8_t)(i + 1)); /* a new L2 table each */
        }
        assert_int_equal(incompat_on_disk(path("lazy.qcow2")) & QCOW2_INCOMPAT_DIRTY,
                         lazy ? QCOW2_INCOMPAT_DIRTY : 0);
        assert_int_equal(q2_refcounts_lazy(q2_state(bs)), lazy);
        assert_int_equal(vd_flush(bs), 0);
        /* a flush keeps the bit (as QEMU); the refcounts on disk are exact now */
        assert_int_equal(incompat_on_disk(path("lazy.qcow2")) & QCOW2_INCOMPAT_DIRTY,
                         lazy ? QCOW2_INCOMPAT_DIRTY : 0);
        write_pat(bs, 255ULL << 20, 4096, 0x99);
        vd_node_unref(bs);
        assert_int_equal(incompat_on_disk(path("lazy.qcow2")) & QCOW2_INCOMPAT_DIRTY, 0);
        assert_clean(path("lazy.qcow2"));
        bs = vd_open_image(path("lazy.qcow2"), "qcow2", 0, &err);
        assert_non_null(bs);
        for (int i = 0; i < 64; i++) {
            assert_reads(bs, (uint64_t)i << 22, 4096, (uint8_t)(i + 1));
        }
        assert_reads(bs, 255ULL << 20, 4096, 0x99);
        vd_node_unref(bs);
    }
}

typedef struct {
    BlockNode *bs;
    int id;
} ThreadArg;

static void *writer(void *p)
{
    ThreadArg *a = p;
    uint8_t buf[12288];
    for (int i = 0; i < 32; i++) {
        uint64_t off = ((uint64_t)i * 4 + (uint64_t)a->id) * 40000;
        memset(buf, a->id + 1, sizeof(buf));
        if (vd_pwrite(a->bs, off, sizeof(buf), buf, 0) < 0) {
            return (void *)1;
        }
    }
    return NULL;
}

static void test_threads(void **state)
{
    BlockNode *bs = create_open("thr.qcow2", 16 << 20, 4096, 0, NULL, false, NULL, NULL);
    pthread_t t[4];
    ThreadArg a[4];
    for (int i = 0; i < 4; i++) {
        a[i].bs = bs;
        a[i].id = i;
        pthread_create(&t[i], NULL, writer, &a[i]);
    }
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        assert_null(r);
    }
    for (int i = 0; i < 32; i++) {
        for (int id = 0; id < 4; id++) {
            assert_reads(bs, ((uint64_t)i * 4 + (uint64_t)id) * 40000, 12288, (uint8_t)(id + 1));
        }
    }
    vd_node_unref(bs);
    assert_clean(path("thr.qcow2"));
}

/* Compressed writes from several threads (convert -c): compression runs outside s->lock. */
static void *compressed_writer(void *p)
{
    ThreadArg *a = p;
    const uint64_t cs = 4096;
    uint8_t buf[2 * 4096];
    for (int i = 0; i < 64; i++) {
        uint64_t cl = (uint64_t)i * 8 + (uint64_t)a->id * 2; /* two clusters per request */
        for (uint64_t j = 0; j < sizeof(buf); j++) {
            buf[j] = (uint8_t)((j / 64) ^ (uint64_t)(a->id * 31 + i));
        }
        if (vd_pwrite_compressed(a->bs, cl * cs, sizeof(buf), buf) < 0) {
            return (void *)1;
        }
    }
    return NULL;
}

static void test_compressed_threads(void **state)
{
    const uint64_t cs = 4096;
    BlockNode *bs = create_open("cthr.qcow2", 4 << 20, cs, 0, NULL, false, NULL, NULL);
    pthread_t t[4];
    ThreadArg a[4];
    for (int i = 0; i < 4; i++) {
        a[i].bs = bs;
        a[i].id = i;
        pthread_create(&t[i], NULL, compressed_writer, &a[i]);
    }
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        assert_null(r);
    }
    uint8_t r[2 * 4096];
    for (int id = 0; id < 4; id++) {
        for (int i = 0; i < 64; i++) {
            uint64_t cl = (uint64_t)i * 8 + (uint64_t)id * 2;
            assert_int_equal(vd_pread(bs, cl * cs, sizeof(r), r), 0);
            for (uint64_t j = 0; j < sizeof(r); j++) {
                assert_int_equal(r[j], (uint8_t)((j / 64) ^ (uint64_t)(id * 31 + i)));
            }
        }
    }
    /* misaligned requests are still refused */
    assert_int_equal(vd_pwrite_compressed(bs, 512, cs, r), -EINVAL);
    vd_node_unref(bs);
    assert_clean(path("cthr.qcow2"));
    if (have_qemu_img()) {
        char cmd[512];
        snprintf(cmd, sizeof(cmd), "qemu-img check '%s' | grep -q '100.00%% compressed clusters'",
                 path("cthr.qcow2"));
        assert_int_equal(system(cmd), 0);
    }
}

static void test_truncate(void **state)
{
    BlockNode *bs = create_open("trunc.qcow2", 1 << 20, 0, 0, NULL, false, NULL, NULL);
    write_pat(bs, 0, 1 << 20, 0x61);
    VdError *err = NULL;
    assert_true(vd_truncate(bs, 1536, false, VD_PREALLOC_OFF, &err) < 0); /* no shrink flag */
    vd_error_free(err);
    err = NULL;
    assert_true(vd_truncate(bs, 1000, true, VD_PREALLOC_OFF, &err) < 0); /* not 512-aligned */
    vd_error_free(err);
    err = NULL;
    assert_int_equal(vd_truncate(bs, 1536, true, VD_PREALLOC_OFF, &err), 0);
    assert_int_equal(vd_getlength(bs), 1536);
    assert_int_equal(vd_truncate(bs, 3ULL << 30, false, VD_PREALLOC_OFF, &err), 0);
    assert_reads(bs, 0, 1536, 0x61);
    assert_reads(bs, 1536, 200000, 0); /* the old tail was zeroed */
    write_pat(bs, 2ULL << 30, 4096, 0x62);
    assert_reads(bs, 2ULL << 30, 4096, 0x62);
    vd_node_unref(bs);
    assert_clean(path("trunc.qcow2"));
}

static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run(const char *fmt, ...)
{
    char cmd[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd);
}

static void test_snapshot_cow(void **state)
{
    if (!have_qemu_img()) {
        skip();
    }
    BlockNode *bs = create_open("snap.qcow2", 8 << 20, 0, 0, NULL, false, NULL, NULL);
    write_pat(bs, 0, 2 << 20, 0x10);
    vd_node_unref(bs);
    assert_int_equal(run("qemu-img snapshot -c s1 '%s'", path("snap.qcow2")), 0);
    VdError *err = NULL;
    bs = vd_open_image(path("snap.qcow2"), "qcow2", VD_OPEN_RDWR, &err);
    assert_non_null(bs);
    write_pat(bs, 1000, 70000, 0x20);                   /* COW of shared clusters + table */
    assert_int_equal(vd_pwrite_zeroes(bs, 1 << 20, 65536, VD_REQ_MAY_UNMAP), 0);
    assert_int_equal(vd_pdiscard(bs, (1 << 20) + 65536, 65536, VD_REQ_FULL_DISCARD), 0);
    assert_reads(bs, 0, 1000, 0x10);
    assert_reads(bs, 1000, 70000, 0x20);
    assert_reads(bs, 71000, (1 << 20) - 71000, 0x10);
    assert_reads(bs, 1 << 20, 131072, 0);
    vd_node_unref(bs);
    assert_clean(path("snap.qcow2"));
    /* the snapshot still holds the old contents */
    assert_int_equal(run("qemu-img convert -l s1 -O raw '%s' '%s'", path("snap.qcow2"),
                         path("snap.raw")), 0);
    BlockNode *raw = vd_open_image(path("snap.raw"), "raw", 0, &err);
    assert_non_null(raw);
    assert_reads(raw, 0, 2 << 20, 0x10);
    assert_reads(raw, 2 << 20, 6 << 20, 0);
    vd_node_unref(raw);
    assert_int_equal(run("qemu-img snapshot -d s1 '%s'", path("snap.qcow2")), 0);
    assert_clean(path("snap.qcow2"));
}

static void test_qemu_images(void **state)
{
    if (!have_qemu_img()) {
        skip();
    }
    const char *opts[] = { "extended_l2=on", "compat=0.10", "cluster_size=512,refcount_bits=1",
                           "cluster_size=2M" };
    for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
        assert_int_equal(run("qemu-img create -q -f qcow2 -o %s '%s' 8M", opts[i],
                             path("qi.qcow2")), 0);
        assert_int_equal(run("qemu-io -c 'write -P 0xab 4096 64k' -c 'write -z 2M 1M' "
                             "-c 'write -P 0xcd 5M 3000' '%s' >/dev/null", path("qi.qcow2")), 0);
        VdError *err = NULL;
        BlockNode *bs = vd_open_image(path("qi.qcow2"), "qcow2", VD_OPEN_RDWR, &err);
        assert_non_null(bs);
        assert_reads(bs, 0, 4096, 0);
        assert_reads(bs, 4096, 65536, 0xab);
        assert_reads(bs, 4096 + 65536, 100000, 0);
        assert_reads(bs, 5 << 20, 3000, 0xcd);
        write_pat(bs, 4096 + 60000, 10000, 0x01);
        vd_node_unref(bs);
        assert_clean(path("qi.qcow2"));
        assert_int_equal(run("qemu-io -c 'read -P 0xab 4096 60000' -c 'read -P 1 64096 10000' "
                             "-c 'read -P 0 74096 1536' -c 'read -P 0xcd 5M 3000' '%s' "
                             "| grep -q 'Pattern verification failed'", path("qi.qcow2")), 256);
    }
    /* compressed images written by qemu, zlib and zstd */
    const char *ct[] = { "zlib", "zstd" };
    for (int i = 0; i < 2; i++) {
        assert_int_equal(run("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -c "
                             "'write -P 0x3c 0 1M' '%s' >/dev/null && qemu-img convert -c -O qcow2 "
                             "-o compression_type=%s '%s' '%s'", path("src.qcow2"),
                             path("src.qcow2"), ct[i], path("src.qcow2"), path("qc.qcow2")), 0);
        VdError *err = NULL;
        BlockNode *bs = vd_open_image(path("qc.qcow2"), "qcow2", 0, &err);
        assert_non_null(bs);
        uint64_t pnum;
        assert_int_equal(status(bs, 0, 1 << 20, &pnum, NULL), VD_BS_DATA | VD_BS_ALLOCATED);
        assert_reads(bs, 0, 1 << 20, 0x3c);
        vd_node_unref(bs);
    }
}

static void test_prealloc_and_zero(void **state)
{
    VdCreateOptions o;
    memset(&o, 0, sizeof(o));
    o.format = "qcow2";
    o.size = 4 << 20;
    o.size_given = true;
    o.prealloc = VD_PREALLOC_METADATA;
    VdError *err = NULL;
    assert_int_equal(vd_drv_qcow2.create(path("pre.qcow2"), &o, &err), 0);
    BlockNode *bs = vd_open_image(path("pre.qcow2"), "qcow2", VD_OPEN_RDWR, &err);
    assert_non_null(bs);
    uint64_t pnum, map;
    /* metadata preallocation detected: the driver asks the generic layer to look at the file */
    assert_int_equal(status(bs, 0, 4 << 20, &pnum, &map),
                     VD_BS_DATA | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID | VD_BS_RECURSE);
    assert_int_equal(pnum, 4 << 20); /* one contiguous extent */
    /* ... and the generic layer reports the file's holes as zero, as qemu-img map does */
    VdBlockStatus gst;
    assert_int_equal(vd_block_status(bs, 0, 4 << 20, &pnum, &gst), 0);
    assert_int_equal(gst.flags, VD_BS_DATA | VD_BS_ZERO | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID);
    assert_reads(bs, 0, 4 << 20, 0);
    /* a partial cluster of data cannot be zeroed in metadata; whole clusters keep their host */
    write_pat(bs, 65536 + 100, 50, 0x44);
    assert_int_equal(vd_pwrite_zeroes(bs, 65536, 4096, VD_REQ_NO_FALLBACK), -ENOTSUP);
    assert_int_equal(vd_pwrite_zeroes(bs, 65536, 65536, VD_REQ_NO_FALLBACK), 0);
    uint64_t map2;
    assert_int_equal(status(bs, 65536, 65536, &pnum, &map2),
                     VD_BS_ZERO | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID);
    assert_int_equal(map2, map + 65536);
    assert_reads(bs, 65536, 65536, 0);
    vd_node_unref(bs);
    assert_clean(path("pre.qcow2"));
    /* backing + preallocation needs extended L2 (as qemu-img) */
    o.backing_file = "pre.qcow2";
    o.backing_fmt = "qcow2";
    err = NULL;
    assert_true(vd_drv_qcow2.create(path("pre2.qcow2"), &o, &err) < 0);
    vd_error_free(err);
}

static int setup(void **state)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_qcow2.XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

/*
 * Lockless data I/O stress: 4 threads mix reads, overwrites (in place and allocating/COW of
 * clusters shared with an internal snapshot), discards and zero-writes, plus a flusher. Each
 * thread checks data only in its own units (interleaved 4-cluster units, so neighbours share L2
 * tables and refcount blocks) against its private model; in the shared second half all threads
 * hit overlapping ranges and only success is checked. Then every unit is re-read and the image
 * must check clean (no leak, no corruption; a cluster freed under a lockless I/O would show).
 */
#define ST_CS 4096ULL
#define ST_SIZE ((4ULL << 20) + (256ULL << 10))
#define ST_UNIT (4 * ST_CS)
#define ST_OWNED (4ULL << 20)
#define ST_THREADS 4

typedef struct StressArg {
    BlockNode *bs;
    int id;
    uint64_t rng;
    uint8_t *model; /* ST_OWNED bytes, shared array; a thread touches only its own units */
    int fail;
    volatile int *stop;
} StressArg;

static uint64_t st_rand(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void st_range(StressArg *a, bool owned, uint64_t *off, uint64_t *len)
{
    uint64_t r = st_rand(&a->rng);
    uint64_t gran = (r & 1) ? 512 : ST_CS; /* sub-cluster requests need COW */
    if (owned) {
        uint64_t nunits = ST_OWNED / ST_UNIT;
        uint64_t u = (st_rand(&a->rng) % (nunits / ST_THREADS)) * ST_THREADS + (uint64_t)a->id;
        uint64_t slots = ST_UNIT / gran;
        uint64_t s0 = st_rand(&a->rng) % slots;
        uint64_t n = 1 + st_rand(&a->rng) % (slots - s0);
        *off = u * ST_UNIT + s0 * gran;
        *len = n * gran;
    } else {
        uint64_t slots = (ST_SIZE - ST_OWNED) / gran;
        uint64_t s0 = st_rand(&a->rng) % slots;
        uint64_t maxn = slots - s0 < 24 ? slots - s0 : 24;
        *off = ST_OWNED + s0 * gran;
        *len = (1 + st_rand(&a->rng) % maxn) * gran;
    }
}

static void *stress_worker(void *p)
{
    StressArg *a = p;
    uint8_t *buf = malloc(24 * ST_CS);
    uint8_t *chk = malloc(24 * ST_CS);
    if (!buf || !chk) {
        a->fail = 1;
        goto out;
    }
    for (int it = 0; it < 1200 && !a->fail; it++) {
        bool owned = (st_rand(&a->rng) % 3) != 0;
        uint64_t off, len;
        st_range(a, owned, &off, &len);
        int op = (int)(st_rand(&a->rng) % 100);
        int ret;
        if (op < 40) {
            ret = vd_pread(a->bs, off, len, buf);
            if (ret == 0 && owned && memcmp(buf, a->model + off, len) != 0) {
                uint64_t d = 0;
                while (buf[d] == a->model[off + d]) {
                    d++;
                }
                fprintf(stderr, "stress: thread %d read mismatch at %llu+%llu (it %d, byte %llu: "
                        "%02x, want %02x)\n", a->id, (unsigned long long)off,
                        (unsigned long long)len, it, (unsigned long long)d, buf[d],
                        a->model[off + d]);
                a->fail = 1;
            }
        } else if (op < 80) {
            uint64_t seed = st_rand(&a->rng);
            for (uint64_t i = 0; i < len; i += 8) {
                uint64_t v = seed ^ (i * 0x9e3779b97f4a7c15ULL);
                memcpy(buf + i, &v, 8);
            }
            ret = vd_pwrite(a->bs, off, len, buf, 0);
            if (ret == 0 && owned) {
                memcpy(a->model + off, buf, len);
            }
        } else if (op < 90) {
            ret = vd_pdiscard(a->bs, off, len, VD_REQ_FULL_DISCARD);
            /* only whole clusters are dropped (no backing: they read as zeroes) */
            uint64_t ca = (off + ST_CS - 1) & ~(ST_CS - 1), cb = (off + len) & ~(ST_CS - 1);
            if (ret == 0 && owned && ca < cb) {
                memset(a->model + ca, 0, cb - ca);
            }
        } else {
            ret = vd_pwrite_zeroes(a->bs, off, len, (op & 1) ? VD_REQ_MAY_UNMAP : 0);
            if (ret == 0 && owned) {
                memset(a->model + off, 0, len);
            }
        }
        if (ret != 0) {
            fprintf(stderr, "stress: thread %d op %d at %llu+%llu: %d\n", a->id, op,
                    (unsigned long long)off, (unsigned long long)len, ret);
            a->fail = 1;
        }
    }
    (void)chk;
out:
    free(buf);
    free(chk);
    return NULL;
}

static void *stress_flusher(void *p)
{
    StressArg *a = p;
    while (!__atomic_load_n(a->stop, __ATOMIC_ACQUIRE)) {
        if (vd_flush(a->bs) != 0) {
            a->fail = 1;
        }
        usleep(2000);
    }
    return NULL;
}

/*
 * Run nthreads `worker`s on bs (a[i]: id i, its own rng, the shared model) and a flusher until
 * they end, with the lockless windows widened by delay_us; then check that none failed and that
 * the first len bytes match the model, live and after reopening img read-only.
 */
static void run_and_check(BlockNode *bs, const char *img, void *(*worker)(void *), int nthreads,
                          uint64_t rng, uint8_t *model, uint64_t len, unsigned delay_us)
{
    __atomic_store_n(&q2_test_lockless_delay_us, delay_us, __ATOMIC_RELAXED);
    volatile int stop = 0;
    pthread_t t[ST_THREADS + 1];
    StressArg a[ST_THREADS + 1];
    assert_true(nthreads <= ST_THREADS);
    for (int i = 0; i <= nthreads; i++) {
        a[i] = (StressArg){ .bs = bs, .id = i, .rng = rng * (uint64_t)(i + 3),
                            .model = model, .stop = &stop };
        pthread_create(&t[i], NULL, i < nthreads ? worker : stress_flusher, &a[i]);
    }
    for (int i = 0; i < nthreads; i++) {
        pthread_join(t[i], NULL);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    pthread_join(t[nthreads], NULL);
    __atomic_store_n(&q2_test_lockless_delay_us, 0, __ATOMIC_RELAXED);
    for (int i = 0; i <= nthreads; i++) {
        assert_int_equal(a[i].fail, 0);
    }
    uint8_t *all = malloc(len);
    assert_non_null(all);
    assert_int_equal(vd_pread(bs, 0, len, all), 0);
    assert_memory_equal(all, model, len);
    vd_node_unref(bs);
    /* reopened: what reached the file is the same */
    VdError *err = NULL;
    bs = vd_open_image(img, "qcow2", 0, &err);
    assert_non_null(bs);
    assert_int_equal(vd_pread(bs, 0, len, all), 0);
    assert_memory_equal(all, model, len);
    vd_node_unref(bs);
    free(all);
}

static void test_lockless_stress(void **state)
{
    const char *img = path("stress.qcow2");
    BlockNode *bs = create_open("stress.qcow2", ST_SIZE, ST_CS, 0, NULL, false, NULL, NULL);
    uint8_t *model = malloc(ST_OWNED);
    assert_non_null(model);
    /* prefill every other unit, then snapshot it so those clusters are shared (COW) */
    for (uint64_t off = 0; off < ST_SIZE; off += ST_UNIT) {
        uint8_t v = (uint8_t)(off / ST_UNIT * 7 + 1);
        bool fill = (off / ST_UNIT) % 2 == 0;
        if (fill) {
            write_pat(bs, off, ST_UNIT, v);
        }
        if (off < ST_OWNED) {
            memset(model + off, fill ? v : 0, ST_UNIT);
        }
    }
    vd_node_unref(bs);
    bool snap = have_qemu_img();
    if (snap) {
        assert_int_equal(run("qemu-img snapshot -c s1 '%s'", img), 0);
    }
    VdError *err = NULL;
    bs = vd_open_image(img, "qcow2", VD_OPEN_RDWR, &err);
    assert_non_null(bs);

    /* widen the lockless windows so a cluster freed under one would be caught */
    run_and_check(bs, img, stress_worker, ST_THREADS, 0x1234567ULL, model, ST_OWNED, 1000);
    free(model);
    assert_clean(img);
    if (snap) {
        assert_int_equal(run("qemu-img snapshot -d s1 '%s'", img), 0);
        assert_clean(img);
    }
}

/*
 * Allocating writes run their data I/O without the image lock (qcow2-cluster.c write_step): two
 * writers of different bytes of the SAME unallocated cluster (no range lock above, as convert or
 * a raw caller may do) must not both allocate it, or one's L2 entry would drop the other's
 * bytes. Threads own interleaved 8 KiB slots (pairs straddling cluster boundaries, so multi-
 * cluster allocations with head and tail copy-on-write race too) of an overlay whose backing
 * holds data in half of the clusters (the others read zeroes, so a partial write's copy-on-write
 * decides between zeroing and copying, asking the backing without the lock); each thread reads
 * its own slots back meanwhile (through the backing, unlocked, where nothing is allocated yet),
 * a flusher runs, and the unlocked windows are widened. Every byte is checked against the
 * model, live and after reopening.
 */
#define AC_CS 65536ULL
#define AC_SLOT (AC_CS / 8)
#define AC_SIZE (4ULL << 20)
#define AC_THREADS 4

static int ac_owner(uint64_t slot)
{
    return (int)(((slot + 1) / 2) % AC_THREADS);
}

static void *alloc_worker(void *p)
{
    StressArg *a = p;
    uint8_t *buf = malloc(2 * AC_SLOT);
    if (!buf) {
        a->fail = 1;
        return NULL;
    }
    uint64_t nslots = AC_SIZE / AC_SLOT;
    for (int it = 0; it < 600 && !a->fail; it++) {
        uint64_t g = st_rand(&a->rng) % nslots;
        while (ac_owner(g) != a->id) {
            g = (g + 1) % nslots;
        }
        uint64_t span = (g + 1 < nslots && ac_owner(g + 1) == a->id) ? 2 : 1;
        uint64_t sectors = span * AC_SLOT / 512;
        uint64_t s0 = st_rand(&a->rng) % sectors;
        uint64_t n = 1 + st_rand(&a->rng) % (sectors - s0);
        uint64_t off = g * AC_SLOT + s0 * 512, len = n * 512;
        if (it % 3 == 2) {
            /* read it back meanwhile: unallocated clusters read through the backing unlocked */
            if (vd_pread(a->bs, off, len, buf) != 0 || memcmp(buf, a->model + off, len) != 0) {
                fprintf(stderr, "alloc race: thread %d read %llu+%llu differs\n", a->id,
                        (unsigned long long)off, (unsigned long long)len);
                a->fail = 1;
            }
            continue;
        }
        uint64_t seed = st_rand(&a->rng);
        for (uint64_t i = 0; i < len; i += 8) {
            uint64_t v = seed ^ (i * 0x9e3779b97f4a7c15ULL);
            memcpy(buf + i, &v, 8);
        }
        if (vd_pwrite(a->bs, off, len, buf, 0) != 0) {
            fprintf(stderr, "alloc race: thread %d write %llu+%llu failed\n", a->id,
                    (unsigned long long)off, (unsigned long long)len);
            a->fail = 1;
        } else {
            memcpy(a->model + off, buf, len);
        }
    }
    free(buf);
    return NULL;
}

static void test_alloc_concurrent_same_clusters(void **state)
{
    (void)state;
    BlockNode *base = create_open("acbase.qcow2", AC_SIZE, AC_CS, 0, NULL, false, NULL, NULL);
    uint8_t *model = calloc(1, AC_SIZE);
    assert_non_null(model);
    for (uint64_t c = 0; c < AC_SIZE / AC_CS; c += 2) {
        write_pat(base, c * AC_CS, AC_CS, (uint8_t)(c * 3 + 1));
        memset(model + c * AC_CS, (int)(uint8_t)(c * 3 + 1), AC_CS);
    }
    vd_node_unref(base);
    const char *img = path("acover.qcow2");
    VdError *err = NULL;
    BlockNode *bs = create_open("acover.qcow2", AC_SIZE, AC_CS, 0, NULL, false, NULL,
                                path("acbase.qcow2"));
    vd_node_unref(bs);
    bs = vd_open_image(img, "qcow2", VD_OPEN_RDWR, &err); /* opens its backing too */
    assert_non_null(bs);
    assert_non_null(bs->backing);

    run_and_check(bs, img, alloc_worker, AC_THREADS, 0x9876543ULL, model, AC_SIZE, 300);
    free(model);
    assert_clean(img);
}

/*
 * A qcow2 flush syncs its file once per ordering point and vd_flush adds none (flush_syncs_file):
 * after an allocating write, one sync for the data and refcounts and one after the L2 tables; a
 * flush with nothing written since, one. The data is in the file afterwards.
 */
static void test_flush_sync_count(void **state)
{
    (void)state;
    BlockNode *bs = create_open("fs.qcow2", 4 << 20, 65536, 0, NULL, false, NULL, NULL);
    write_pat(bs, 65536, 65536, 7);
    uint64_t s0 = vd_flush_thread_syncs();
    assert_int_equal(vd_flush(bs), 0);
    uint64_t s1 = vd_flush_thread_syncs();
    assert_int_equal(s1 - s0, 2);
    assert_int_equal(vd_flush(bs), 0);
    assert_int_equal(vd_flush_thread_syncs() - s1, 1);
    vd_node_unref(bs);
    VdError *err = NULL;
    bs = vd_open_image(path("fs.qcow2"), "qcow2", 0, &err);
    assert_non_null(bs);
    assert_reads(bs, 65536, 65536, 7);
    assert_reads(bs, 0, 65536, 0);
    vd_node_unref(bs);
    assert_clean(path("fs.qcow2"));
}

/* Counting wrapper of a file node's driver: bytes of data written, write-zeroes calls. */
static uint64_t cw_bytes;
static int cw_zeroes;
static const BlockDriver *cw_real;
static BlockDriver cw_drv;

static int cw_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    cw_bytes += bytes;
    return cw_real->pwrite(bs, offset, bytes, buf, flags);
}

static int cw_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    cw_zeroes++;
    return cw_real->pwrite_zeroes(bs, offset, bytes, flags);
}

/*
 * A 4 KiB write into a cluster that no layer of the backing chain allocates (after a snapshot,
 * the first write into an empty area of the disk) writes the 4 KiB only, not a 64 KiB buffer of
 * mostly zeroes: no zeroing of the new host cluster at the file's end (an overlay's; a hole reads
 * zeroes), one write-zeroes where it reuses a freed cluster (whose old bytes must not show).
 * Over backing data, or past a backing file's end (which QEMU's is_zero_cow counts as allocated
 * there), the whole cluster is written. Contents and consistency are checked after each.
 */
static void test_cow_of_zeroes_writes_guest_bytes(void **state)
{
    (void)state;
    BlockNode *base = create_open("cz-base.qcow2", 4 << 20, 65536, 0, NULL, false, NULL, NULL);
    write_pat(base, 0, 1 << 20, 0x5b); /* data in the first MiB only */
    vd_node_unref(base);
    BlockNode *mid = create_open("cz-mid.qcow2", 4 << 20, 65536, 0, NULL, false, NULL,
                                 path("cz-base.qcow2"));
    vd_node_unref(mid);
    BlockNode *top = create_open("cz-top.qcow2", 8 << 20, 65536, 0, NULL, false, NULL,
                                 path("cz-mid.qcow2"));
    write_pat(top, 3 << 20, 65536, 0x07); /* allocates the L2 table: not counted below */
    cw_real = top->file->drv;
    cw_drv = *cw_real;
    cw_drv.pwrite = cw_pwrite;
    cw_drv.pwrite_zeroes = cw_pwrite_zeroes;
    top->file->drv = &cw_drv;
    const struct {
        uint64_t cluster;
        uint8_t old, v;
        uint64_t bytes;
        int zeroes;
        bool reuse; /* free the cluster written with 0x07 first: the allocator takes it again */
    } cases[] = {
        { 2 << 20, 0, 0x01, 4096, 0, false },      /* zero in every layer, at the file's end */
        { 6 << 20, 0, 0x02, 65536, 0, false },     /* past the backing's end: "allocated" */
        { 65536, 0x5b, 0x03, 65536, 0, false },    /* backing data: copied */
        { 5 << 19, 0, 0x04, 4096, 1, true },       /* zero chain, a reused host cluster */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        if (cases[i].reuse) {
            assert_int_equal(vd_pdiscard(top, 3 << 20, 65536, VD_REQ_FULL_DISCARD), 0);
            assert_int_equal(vd_flush(top), 0); /* its metadata: not counted below */
        }
        cw_bytes = 0;
        cw_zeroes = 0;
        write_pat(top, cases[i].cluster + 8192, 4096, cases[i].v);
        assert_int_equal(cw_bytes, cases[i].bytes);
        assert_int_equal(cw_zeroes, cases[i].zeroes);
        assert_reads(top, cases[i].cluster, 8192, cases[i].old);
        assert_reads(top, cases[i].cluster + 8192, 4096, cases[i].v);
        assert_reads(top, cases[i].cluster + 12288, 65536 - 12288, cases[i].old);
    }
    top->file->drv = cw_real;
    vd_node_unref(top);
    assert_clean(path("cz-top.qcow2"));
    VdError *err = NULL;
    top = vd_open_image(path("cz-top.qcow2"), "qcow2", 0, &err);
    assert_non_null(top);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_reads(top, cases[i].cluster, 8192, cases[i].old);
        assert_reads(top, cases[i].cluster + 8192, 4096, cases[i].v);
        assert_reads(top, cases[i].cluster + 12288, 65536 - 12288, cases[i].old);
    }
    assert_reads(top, 3 << 20, 65536, 0);
    vd_node_unref(top);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_layout),
        cmocka_unit_test(test_mapping_and_status),
        cmocka_unit_test(test_alloc_free_reuse),
        cmocka_unit_test(test_refblock_entries),
        cmocka_unit_test(test_refcount_widths_growth),
        cmocka_unit_test(test_cache_eviction),
        cmocka_unit_test(test_zero_discard),
        cmocka_unit_test(test_compressed),
        cmocka_unit_test(test_compressed_threads),
        cmocka_unit_test(test_backing_cow),
        cmocka_unit_test(test_damaged_headers),
        cmocka_unit_test(test_tables_outside_file),
        cmocka_unit_test(test_lazy_refcounts),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_truncate),
        cmocka_unit_test(test_snapshot_cow),
        cmocka_unit_test(test_qemu_images),
        cmocka_unit_test(test_prealloc_and_zero),
        cmocka_unit_test(test_lockless_stress),
        cmocka_unit_test(test_alloc_concurrent_same_clusters),
        cmocka_unit_test(test_flush_sync_count),
        cmocka_unit_test(test_cow_of_zeroes_writes_guest_bytes),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
