/*
 * test_block.c - the generic block layer: path resolution, chain opening rules (relative names,
 * loops, missing files, no probing of backing files), range checks, zero emulation, the file
 * protocol and raw format, and block status across chains.
 *
 * Chains are built with "testcow", a tiny backing-capable format defined here, so these tests do
 * not depend on the qcow2 driver; qcow2 chains made by qemu-img are checked when qcow2 is built in.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
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
#include "util/log.h"

/* ------------------------------------------------------------------------------------------ */
/* testcow: header block, then one 4 KiB data block per guest block, allocation bitmap in header */

#define TC_BLOCK 4096U
#define TC_MAGIC "TESTCOW"

typedef struct TcHeader {
    char magic[8];
    uint64_t size;
    char backing[256];
    char backing_fmt[32];
    uint8_t bitmap[TC_BLOCK - 8 - 8 - 256 - 32];
} TcHeader;

typedef struct TcState {
    TcHeader h;
} TcState;

static int tc_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return len >= 8 && !memcmp(buf, TC_MAGIC, 8) ? 100 : 0;
}

static int tc_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    TcState *s = bs->opaque;
    int ret = vd_pread(bs->file, 0, sizeof(s->h), &s->h);
    if (ret < 0 || memcmp(s->h.magic, TC_MAGIC, 8)) {
        vd_error_setg(errp, EINVAL, "not testcow");
        return -EINVAL;
    }
    if (s->h.backing[0]) {
        bs->backing_file = strdup(s->h.backing);
        if (s->h.backing_fmt[0]) {
            bs->backing_format = strdup(s->h.backing_fmt);
        }
    }
    return 0;
}

static void tc_close(BlockNode *bs)
{
}

static bool tc_alloc(TcState *s, uint64_t blk)
{
    return s->h.bitmap[blk / 8] & (1u << (blk % 8));
}

static int tc_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    TcState *s = bs->opaque;
    uint8_t *p = buf;
    while (bytes) {
        uint64_t blk = offset / TC_BLOCK, in = offset % TC_BLOCK;
        uint64_t n = TC_BLOCK - in < bytes ? TC_BLOCK - in : bytes;
        int ret = 0;
        if (tc_alloc(s, blk)) {
            ret = vd_pread(bs->file, TC_BLOCK * (blk + 1) + in, n, p);
        } else if (bs->backing) {
            int64_t bl = vd_getlength(bs->backing);
            memset(p, 0, n);
            if ((int64_t)offset < bl) {
                uint64_t m = (uint64_t)bl - offset < n ? (uint64_t)bl - offset : n;
                ret = vd_pread(bs->backing, offset, m, p);
            }
        } else {
            memset(p, 0, n);
        }
        if (ret < 0) {
            return ret;
        }
        p += n;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int tc_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    TcState *s = bs->opaque;
    const uint8_t *p = buf;
    while (bytes) {
        uint64_t blk = offset / TC_BLOCK, in = offset % TC_BLOCK;
        uint64_t n = TC_BLOCK - in < bytes ? TC_BLOCK - in : bytes;
        if (!tc_alloc(s, blk)) {
            uint8_t tmp[TC_BLOCK];
            int ret = tc_pread(bs, blk * TC_BLOCK, TC_BLOCK, tmp); /* copy-on-write */
            if (ret < 0) {
                return ret;
            }
            ret = vd_pwrite(bs->file, TC_BLOCK * (blk + 1), TC_BLOCK, tmp, 0);
            if (ret < 0) {
                return ret;
            }
            s->h.bitmap[blk / 8] |= (uint8_t)(1u << (blk % 8));
            ret = vd_pwrite(bs->file, 0, sizeof(s->h), &s->h, 0);
            if (ret < 0) {
                return ret;
            }
        }
        int ret = vd_pwrite(bs->file, TC_BLOCK * (blk + 1) + in, n, p, 0);
        if (ret < 0) {
            return ret;
        }
        p += n;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static bool tc_recurse; /* act like qcow2 with metadata preallocation */

static int tc_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                           uint64_t *map, BlockNode **file)
{
    TcState *s = bs->opaque;
    bool a = tc_alloc(s, offset / TC_BLOCK);
    uint64_t end = offset + bytes, pos = offset;
    while (pos < end && tc_alloc(s, pos / TC_BLOCK) == a) {
        pos = (pos / TC_BLOCK + 1) * TC_BLOCK;
    }
    *pnum = (pos < end ? pos : end) - offset;
    if (!a) {
        return 0;
    }
    /* Contiguous in the file because block i lives at (i+1)*TC_BLOCK. */
    *map = TC_BLOCK * (offset / TC_BLOCK + 1) + offset % TC_BLOCK;
    *file = bs->file;
    return VD_BS_DATA | VD_BS_OFFSET_VALID | (tc_recurse ? VD_BS_RECURSE : 0);
}

static int64_t tc_getlength(BlockNode *bs)
{
    return (int64_t)((TcState *)bs->opaque)->h.size;
}

static int tc_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    TcHeader h;
    memset(&h, 0, sizeof(h));
    memcpy(h.magic, TC_MAGIC, 8);
    h.size = opts->size;
    if (opts->backing_file) {
        snprintf(h.backing, sizeof(h.backing), "%s", opts->backing_file);
    }
    if (opts->backing_fmt) {
        snprintf(h.backing_fmt, sizeof(h.backing_fmt), "%s", opts->backing_fmt);
    }
    int fd = open(filename, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0) {
        vd_error_setg_errno(errp, errno, "create %s", filename);
        return -errno;
    }
    ssize_t n = write(fd, &h, sizeof(h));
    close(fd);
    return n == (ssize_t)sizeof(h) ? 0 : -EIO;
}

static int tc_change_backing(BlockNode *bs, const char *backing_file, const char *backing_fmt,
                             int flags, VdError **errp)
{
    TcState *s = bs->opaque;
    memset(s->h.backing, 0, sizeof(s->h.backing));
    memset(s->h.backing_fmt, 0, sizeof(s->h.backing_fmt));
    if (backing_file) {
        snprintf(s->h.backing, sizeof(s->h.backing), "%s", backing_file);
    }
    if (backing_fmt) {
        snprintf(s->h.backing_fmt, sizeof(s->h.backing_fmt), "%s", backing_fmt);
    }
    return vd_pwrite(bs->file, 0, sizeof(s->h), &s->h, 0);
}

static const BlockDriver tc_drv = {
    .name = "testcow",
    .supports_backing = true,
    .state_size = sizeof(TcState),
    .probe = tc_probe,
    .open = tc_open,
    .close = tc_close,
    .create = tc_create,
    .pread = tc_pread,
    .pwrite = tc_pwrite,
    .block_status = tc_block_status,
    .getlength = tc_getlength,
    .change_backing_file = tc_change_backing,
};

/* ------------------------------------------------------------------------------------------ */
/* memproto: a protocol defined outside the tree ("vdmem://..."), bytes in one static buffer */

#define MEM_MAX (4u << 20)
static uint8_t mem_bytes[MEM_MAX];
static uint64_t mem_len;

static int mem_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    return 0;
}

static int mem_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    memset(mem_bytes, 0, sizeof(mem_bytes));
    mem_len = 0;
    return 0;
}

static int mem_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    if (offset > MEM_MAX || bytes > MEM_MAX - offset) {
        return -EIO;
    }
    memcpy(buf, mem_bytes + offset, bytes);
    return 0;
}

static int mem_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    if (offset > MEM_MAX || bytes > MEM_MAX - offset) {
        return -ENOSPC;
    }
    memcpy(mem_bytes + offset, buf, bytes);
    mem_len = offset + bytes > mem_len ? offset + bytes : mem_len;
    return 0;
}

static int mem_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                            uint64_t *map, BlockNode **file)
{
    *pnum = bytes;
    *map = offset;
    *file = bs;
    return VD_BS_DATA | VD_BS_OFFSET_VALID;
}

static int64_t mem_getlength(BlockNode *bs)
{
    return (int64_t)mem_len;
}

static int mem_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                        VdError **errp)
{
    if (size > MEM_MAX) {
        return -ENOSPC;
    }
    mem_len = size;
    return 0;
}

static const char *const mem_schemes[] = {"vdmem", NULL};

static const BlockDriver mem_drv = {
    .name = "vdmem",
    .is_protocol = true,
    .uri_schemes = mem_schemes,
    .open = mem_open,
    .close = tc_close,
    .create = mem_create,
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .block_status = mem_block_status,
    .getlength = mem_getlength,
    .truncate = mem_truncate,
};

/* ------------------------------------------------------------------------------------------ */
/* helpers */

static char tmpdir[256];
static char origdir[4096];

static int setup_dir(void **state)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/vdisk-test-block-XXXXXX");
    if (!mkdtemp(tmpdir) || !getcwd(origdir, sizeof(origdir)) || chdir(tmpdir) < 0) {
        return -1;
    }
    return 0;
}

static int teardown_dir(void **state)
{
    char cmd[512];
    if (chdir(origdir) < 0) {
        return -1;
    }
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void make_raw(const char *name, uint64_t size)
{
    VdCreateOptions o = { .format = "raw", .size = size, .size_given = true };
    VdError *err = NULL;
    int ret = vd_create(&o, name, &err);
    if (ret < 0) {
        fail_msg("create %s: %s", name, vd_error_msg(err));
    }
}

static void make_tc(const char *name, uint64_t size, const char *backing, const char *fmt)
{
    VdCreateOptions o = { .format = "testcow", .size = size, .size_given = size != 0,
                          .backing_file = backing, .backing_fmt = fmt, .unsafe = true };
    VdError *err = NULL;
    if (!size) {
        o.unsafe = false;
    }
    int ret = vd_create(&o, name, &err);
    if (ret < 0) {
        fail_msg("create %s: %s", name, vd_error_msg(err));
    }
}

static BlockNode *open_ok(const char *name, const char *fmt, int flags)
{
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(name, fmt, flags, &err);
    if (!bs) {
        fail_msg("open %s: %s", name, vd_error_msg(err));
    }
    return bs;
}

/* Open expecting failure; returns the error code and checks the message mentions `needle`. */
static int open_fails(const char *name, const char *fmt, int flags, const char *needle)
{
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(name, fmt, flags, &err);
    assert_null(bs);
    assert_non_null(err);
    if (needle && !strstr(vd_error_msg(err), needle)) {
        fail_msg("error '%s' does not mention '%s'", vd_error_msg(err), needle);
    }
    int code = vd_error_code(err);
    vd_error_free(err);
    return code;
}

static void fill(BlockNode *bs, uint64_t off, uint64_t len, int byte)
{
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    memset(buf, byte, len);
    assert_int_equal(vd_pwrite(bs, off, len, buf, 0), 0);
    free(buf);
}

static void expect_bytes(BlockNode *bs, uint64_t off, uint64_t len, int byte)
{
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    memset(buf, 0xee, len);
    assert_int_equal(vd_pread(bs, off, len, buf), 0);
    for (uint64_t i = 0; i < len; i++) {
        if (buf[i] != (uint8_t)byte) {
            fail_msg("byte %llu: got 0x%02x want 0x%02x", (unsigned long long)(off + i), buf[i],
                     byte);
        }
    }
    free(buf);
}

/* ------------------------------------------------------------------------------------------ */
/* paths */

/* ---- VD_OPEN_NO_FLUSH (cache=unsafe) ---- */

static int nf_syncs;
static int (*nf_real_flush)(BlockNode *bs);
static int nf_real_pwrite_flags;
static int (*nf_real_pwrite)(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                             int flags);

static int nf_flush(BlockNode *bs)
{
    nf_syncs++;
    return nf_real_flush(bs);
}

static int nf_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    nf_real_pwrite_flags |= flags;
    return nf_real_pwrite(bs, offset, bytes, buf, flags);
}

static BlockDriver nf_drv;

/* Open name (a file node) with flags and make its driver count syncs and record write flags. */
static BlockNode *nf_open_file(const char *name, int flags)
{
    BlockNode *f = open_ok(name, "file", flags);
    nf_drv = *f->drv;
    nf_real_flush = f->drv->flush;
    nf_real_pwrite = f->drv->pwrite;
    nf_drv.flush = nf_flush;
    nf_drv.pwrite = nf_pwrite;
    f->drv = &nf_drv;
    return f;
}

static void test_open_no_flush(void **state)
{
    make_raw("nf.raw", 1 << 20);
    for (int unsafe = 0; unsafe <= 1; unsafe++) {
        int flags = VD_OPEN_RDWR | (unsafe ? VD_OPEN_NO_FLUSH : 0);
        /* a protocol node alone */
        BlockNode *f = nf_open_file("nf.raw", flags);
        nf_syncs = 0;
        nf_real_pwrite_flags = 0;
        fill(f, 0, 4096, 1);
        uint8_t b[512] = { 2 };
        assert_int_equal(vd_pwrite(f, 4096, sizeof(b), b, VD_REQ_FUA), 0);
        assert_int_equal(nf_real_pwrite_flags & VD_REQ_FUA, unsafe ? 0 : VD_REQ_FUA);
        assert_int_equal(vd_flush(f), 0);
        assert_int_equal(nf_syncs, unsafe ? 0 : 1);
        /* a format node over it: its flush and its final flush at unref sync nothing */
        VdOpenOptions o = { .filename = "nf.raw", .format = "raw", .flags = flags, .file = f };
        VdError *err = NULL;
        BlockNode *bs = vd_open(&o, &err);
        assert_non_null(bs);
        vd_node_unref(f); /* bs holds its own reference */
        nf_syncs = 0;
        fill(bs, 8192, 4096, 3);
        assert_int_equal(vd_flush(bs), 0);
        vd_node_unref(bs);
        assert_int_equal(nf_syncs, unsafe ? 0 : 3); /* flush, unref of bs, unref of file */
        /* the data still reached the file */
        BlockNode *r = open_ok("nf.raw", "raw", 0);
        expect_bytes(r, 8192, 4096, 3);
        vd_node_unref(r);
    }
}

static void test_resolve_backing_path(void **state)
{
    struct { const char *img, *bk, *want; } cases[] = {
        { "top.qcow2", "base.qcow2", "base.qcow2" },
        { "dir/top.qcow2", "base.qcow2", "dir/base.qcow2" },
        { "/a/b/top", "../c/base", "/a/b/../c/base" },
        { "/a/b/top", "/abs/base", "/abs/base" },
        { "dir/top", "nbd://host:10809/exp", "nbd://host:10809/exp" },
        { "dir/top", "nbd+unix:///exp?socket=/s", "nbd+unix:///exp?socket=/s" },
        { "/x/top", "sub/dir/base", "/x/sub/dir/base" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *r = vd_resolve_backing_path(cases[i].img, cases[i].bk);
        assert_non_null(r);
        assert_string_equal(r, cases[i].want);
        free(r);
    }
}

static void test_relative_path(void **state)
{
    struct { const char *img, *tgt, *want; } cases[] = {
        { "/a/b/top", "/a/c/base", "../c/base" },
        { "/a/top", "/a/base", "base" },
        { "/a/top", "/a/x/y/base", "x/y/base" },
        { "/a/b/c/top", "/base", "../../../base" },
        { "/a/b/top", "/a/b/../c/./base", "../c/base" },
        { "/a/top", "nbd://h/e", "nbd://h/e" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *r = vd_relative_path(cases[i].img, cases[i].tgt);
        assert_non_null(r);
        assert_string_equal(r, cases[i].want);
        free(r);
    }
    /* Relative inputs are taken from the current directory (the temp dir). */
    char *r = vd_relative_path("sub/top", "base");
    assert_string_equal(r, "../base");
    free(r);
    /* Round trip: resolving the relative name from the image gives the same file. */
    assert_int_equal(mkdir("rt", 0755), 0);
    make_raw("rt-base", 4096);
    r = vd_relative_path("rt/top", "rt-base");
    char *full = vd_resolve_backing_path("rt/top", r);
    struct stat a, b;
    assert_int_equal(stat(full, &a), 0);
    assert_int_equal(stat("rt-base", &b), 0);
    assert_true(a.st_ino == b.st_ino);
    free(r);
    free(full);
}

/* ------------------------------------------------------------------------------------------ */
/* raw + file */

static void test_raw_io_and_ranges(void **state)
{
    make_raw("r1.raw", 1 << 20);
    BlockNode *bs = open_ok("r1.raw", "raw", VD_OPEN_RDWR);
    assert_string_equal(bs->drv->name, "raw");
    assert_int_equal(vd_getlength(bs), 1 << 20);
    fill(bs, 4096, 8192, 0xab);
    expect_bytes(bs, 4096, 8192, 0xab);
    expect_bytes(bs, 0, 4096, 0);

    uint8_t buf[16];
    /* Past the end: refused, not silently short. */
    assert_int_equal(vd_pread(bs, (1 << 20) - 8, 16, buf), -EINVAL);
    assert_int_equal(vd_pwrite(bs, (1 << 20) - 8, 16, buf, 0), -EINVAL);
    assert_int_equal(vd_pwrite(bs, 1 << 20, 1, buf, 0), -EINVAL);
    assert_int_equal(vd_pwrite_zeroes(bs, (1 << 20) - 8, 16, 0), -EINVAL);
    assert_int_equal(vd_pread(bs, UINT64_MAX - 4, 16, buf), -EINVAL);
    /* Zero-length at the end is fine; the last byte is readable. */
    assert_int_equal(vd_pread(bs, 1 << 20, 0, buf), 0);
    assert_int_equal(vd_pread(bs, (1 << 20) - 1, 1, buf), 0);
    /* The write did not grow the file. */
    assert_int_equal(vd_getlength(bs), 1 << 20);
    vd_node_unref(bs);

    /* Read-only nodes refuse every kind of write. */
    bs = open_ok("r1.raw", "raw", 0);
    assert_true(bs->read_only);
    assert_int_equal(vd_pwrite(bs, 0, 16, buf, 0), -EPERM);
    assert_int_equal(vd_pwrite_zeroes(bs, 0, 16, 0), -EPERM);
    assert_int_equal(vd_pdiscard(bs, 0, 4096, 0), -EPERM);
    VdError *err = NULL;
    assert_int_equal(vd_truncate(bs, 2 << 20, false, VD_PREALLOC_OFF, &err), -EPERM);
    assert_non_null(err);
    vd_error_free(err);
    expect_bytes(bs, 4096, 8192, 0xab);
    vd_node_unref(bs);
}

static void test_probe(void **state)
{
    make_raw("p.raw", 65536);
    make_tc("p.tc", 65536, NULL, NULL);
    VdError *err = NULL;
    assert_string_equal(vd_probe_format("p.raw", &err), "raw");
    assert_string_equal(vd_probe_format("p.tc", &err), "testcow");
    assert_null(vd_probe_format("does-not-exist", &err));
    assert_int_equal(vd_error_code(err), ENOENT);
    vd_error_free(err);
    /* The top image is probed when no format is given. */
    BlockNode *bs = open_ok("p.tc", NULL, 0);
    assert_string_equal(bs->drv->name, "testcow");
    vd_node_unref(bs);
    /* A guessed raw image refuses to become qcow2 through a write to its first sector. */
    if (vd_find_driver("qcow2")) {
        BlockNode *g = open_ok("p.raw", NULL, VD_OPEN_RDWR);
        assert_string_equal(g->drv->name, "raw");
        uint8_t hdr[512] = { 'Q', 'F', 'I', 0xfb, 0, 0, 0, 3 };
        assert_int_equal(vd_pwrite(g, 0, sizeof(hdr), hdr, 0), -EPERM);
        /* Piecewise: the version first (harmless alone), then the magic completes a header. */
        assert_int_equal(vd_pwrite(g, 4, 4, "\0\0\0\3", 0), 0);
        assert_int_equal(vd_pwrite(g, 0, 4, "QFI\xfb", 0), -EPERM);
        assert_int_equal(vd_pwrite(g, 0, 4, "QFI!", 0), 0); /* harmless bytes are fine */
        assert_int_equal(vd_pwrite(g, 512, sizeof(hdr), hdr, 0), 0);
        vd_node_unref(g);
        g = open_ok("p.raw", "raw", VD_OPEN_RDWR); /* given format: no restriction */
        assert_int_equal(vd_pwrite(g, 0, sizeof(hdr), hdr, 0), 0);
        vd_node_unref(g);
    }
    /* Empty files are raw. */
    make_raw("empty.raw", 0);
    assert_string_equal(vd_probe_format("empty.raw", &err), "raw");
}

/* vd_protocol_for picks protocols by the schemes drivers declare, and nothing else. */
static void test_protocol_by_scheme(void **state)
{
    VdError *err = NULL;
    assert_string_equal(vd_protocol_for("/some/path", &err)->name, "file");
    assert_string_equal(vd_protocol_for("rel/path:with:colons", &err)->name, "file");
    assert_string_equal(vd_protocol_for("nbd://127.0.0.1/e", &err)->name, "nbd");
    assert_string_equal(vd_protocol_for("nbds+unix:///e?socket=/s", &err)->name, "nbd");
    assert_string_equal(vd_protocol_for("vdmem://disk", &err)->name, "vdmem");
    assert_null(err);
    const char *unknown[] = {"vdmemx://disk", "nbdx://h/e", "json:{\"driver\":\"file\"}"};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        assert_null(vd_protocol_for(unknown[i], &err));
        assert_int_equal(vd_error_code(err), ENOTSUP);
        assert_non_null(strstr(vd_error_msg(err), "unknown protocol"));
        vd_error_free(err);
        err = NULL;
    }
}

/*
 * A protocol registered from outside the tree carries formats with no other change: qcow2 is
 * created on it, probed, written and read back; raw on it is not rounded up to 512 bytes (it
 * does not read zeroes past its end), and it takes no format locks (it has no lock_for_format).
 */
static void test_new_protocol_carries_formats(void **state)
{
    VdCreateOptions co = { .format = "qcow2", .size = 1 << 20, .size_given = true };
    VdError *err = NULL;
    if (vd_create(&co, "vdmem://disk", &err) < 0) {
        fail_msg("create qcow2 on vdmem: %s", vd_error_msg(err));
    }
    assert_memory_equal(mem_bytes, "QFI\xfb", 4);
    BlockNode *bs = open_ok("vdmem://disk", NULL, VD_OPEN_RDWR);
    assert_string_equal(bs->drv->name, "qcow2");
    assert_string_equal(bs->file->drv->name, "vdmem");
    fill(bs, 65536 + 512, 4096, 0x5a);
    expect_bytes(bs, 65536 + 512, 4096, 0x5a);
    expect_bytes(bs, 0, 65536, 0);
    json_t *info = vd_image_info(bs, &err);
    assert_non_null(info);
    assert_string_equal(json_string_value(json_object_get(info, "format")), "qcow2");
    assert_true(json_is_false(json_object_get(info, "dirty-flag")));
    json_decref(info);
    vd_node_unref(bs);

    assert_int_equal(mem_create("vdmem://r", NULL, &err), 0);
    uint8_t odd[1000];
    memset(odd, 0x11, sizeof(odd));
    assert_int_equal(mem_pwrite(NULL, 0, sizeof(odd), odd, 0), 0);
    BlockNode *r = open_ok("vdmem://r", "raw", 0);
    assert_int_equal(vd_getlength(r), 1024); /* whole 512-byte sectors, as QEMU counts */
    info = vd_image_info(r, &err);
    assert_non_null(info);
    assert_null(json_object_get(info, "dirty-flag")); /* vdmem does not answer; raw asks it */
    json_decref(info);
    vd_node_unref(r);
}

static void test_file_protocol(void **state)
{
    make_raw("f.bin", 10000);
    BlockNode *bs = open_ok("f.bin", "file", VD_OPEN_RDWR);
    assert_true(bs->drv->is_protocol);
    /* Reads past EOF return zeroes (formats read partial last clusters). */
    uint8_t buf[8192];
    memset(buf, 0x55, sizeof(buf));
    int fd = open("f.bin", O_WRONLY);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, "\x11\x11\x11\x11", 4, 9996), 4);
    close(fd);
    assert_int_equal(vd_pread(bs, 8192, 8192, buf), 0);
    for (int i = 0; i < 8192; i++) {
        int want = (i >= 9996 - 8192 && i < 10000 - 8192) ? 0x11 : 0;
        if (buf[i] != want) {
            fail_msg("byte %d = %#x", i, buf[i]);
        }
    }
    /* Writes past EOF grow a protocol node. */
    fill(bs, 20000, 100, 0x77);
    assert_int_equal(vd_getlength(bs), 20480); /* 20100 bytes: rounded to whole sectors */
    struct stat grown;
    assert_int_equal(stat("f.bin", &grown), 0);
    assert_int_equal(grown.st_size, 20100);
    expect_bytes(bs, 20100, 380, 0);
    expect_bytes(bs, 10000, 10000, 0);
    expect_bytes(bs, 20000, 100, 0x77);

    /* write_zeroes with unmap punches a hole that block status reports as zero. */
    fill(bs, 0, 20100, 0x33);
    assert_int_equal(vd_truncate(bs, 1 << 20, false, VD_PREALLOC_OFF, NULL), 0);
    fill(bs, 0, 1 << 20, 0x33);
    assert_int_equal(vd_pwrite_zeroes(bs, 65536, 131072, VD_REQ_MAY_UNMAP), 0);
    expect_bytes(bs, 65536, 131072, 0);
    expect_bytes(bs, 65536 - 4096, 4096, 0x33);
    expect_bytes(bs, 65536 + 131072, 4096, 0x33);
    uint64_t pnum;
    VdBlockStatus st;
    assert_int_equal(vd_block_status(bs, 65536, 1 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 131072);
    assert_int_equal(st.flags, VD_BS_ZERO | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID);
    assert_int_equal(st.offset, 65536);
    assert_ptr_equal(st.file, bs);
    assert_int_equal(vd_block_status(bs, 0, 1 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 65536);
    assert_int_equal(st.flags, VD_BS_DATA | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID);
    /* Zero-range (no unmap) also reads back zeroes and keeps the size. */
    assert_int_equal(vd_pwrite_zeroes(bs, 300000, 5000, 0), 0);
    expect_bytes(bs, 300000, 5000, 0);
    expect_bytes(bs, 305000, 100, 0x33);
    assert_int_equal(vd_getlength(bs), 1 << 20);
    /* Discard punches too. */
    assert_int_equal(vd_pdiscard(bs, 524288, 65536, 0), 0);
    expect_bytes(bs, 524288, 65536, 0);
    /* Shrink needs the flag. */
    VdError *err = NULL;
    assert_int_equal(vd_truncate(bs, 4096, false, VD_PREALLOC_OFF, &err), -EINVAL);
    vd_error_free(err);
    assert_int_equal(vd_truncate(bs, 4096, true, VD_PREALLOC_OFF, NULL), 0);
    assert_int_equal(vd_getlength(bs), 4096);
    /* Full preallocation allocates. */
    assert_int_equal(vd_truncate(bs, 4096 + (1 << 20), false, VD_PREALLOC_FULL, NULL), 0);
    struct stat sb;
    assert_int_equal(stat("f.bin", &sb), 0);
    assert_true(sb.st_blocks * 512 >= (1 << 20));
    assert_int_equal(vd_flush(bs), 0);
    /* FUA writes (RWF_DSYNC or write + flush) land like plain ones. */
    assert_int_equal(vd_pwrite(bs, 100, 5, "hello", VD_REQ_FUA), 0);
    uint8_t h[5];
    assert_int_equal(vd_pread(bs, 100, 5, h), 0);
    assert_memory_equal(h, "hello", 5);
    vd_node_unref(bs);
}

/*
 * vd_start_writeback queues a file's dirty pages for the disk without syncing (a copy job's early
 * writeback): the bytes read back unchanged, the node counts no sync, and a format node (whose
 * driver has none) answers -ENOTSUP so the caller falls back to a flush of its file.
 */
static void test_start_writeback(void **state)
{
    make_raw("wb.raw", 1 << 20);
    BlockNode *bs = open_ok("wb.raw", "raw", VD_OPEN_RDWR);
    fill(bs, 4096, 300000, 0x5a);
    uint64_t syncs = vd_flush_thread_syncs();
    assert_int_equal(vd_start_writeback(bs->file), 0);
    assert_int_equal(vd_flush_thread_syncs(), syncs);
    assert_int_equal(vd_start_writeback(bs), -ENOTSUP);
    assert_int_equal(vd_start_writeback(NULL), -ENOTSUP);
    fill(bs, 100000, 5000, 0xa5); /* written while the writeback may still run */
    assert_int_equal(vd_start_writeback(bs->file), 0);
    expect_bytes(bs, 0, 4096, 0);
    expect_bytes(bs, 4096, 100000 - 4096, 0x5a);
    expect_bytes(bs, 100000, 5000, 0xa5);
    expect_bytes(bs, 105000, 304096 - 105000, 0x5a);
    expect_bytes(bs, 304096, (1 << 20) - 304096, 0);
    vd_node_unref(bs);
}

static void test_direct_io(void **state)
{
    make_raw("d.raw", 1 << 20);
    VdError *err = NULL;
    BlockNode *bs = vd_open_image("d.raw", "raw", VD_OPEN_RDWR | VD_OPEN_DIRECT, &err);
    if (!bs) {
        vd_error_free(err);
        skip(); /* filesystem without O_DIRECT */
    }
    /* Unaligned offsets, lengths and buffers go through bounce buffers and RMW. */
    uint8_t *buf = malloc(70000);
    for (int i = 0; i < 70000; i++) {
        buf[i] = (uint8_t)(i * 7 + 1);
    }
    assert_int_equal(vd_pwrite(bs, 1001, 69999, buf + 1, 0), 0);
    assert_int_equal(vd_pwrite(bs, 512, 3, "xyz", 0), 0);
    uint8_t *rd = malloc(80000);
    assert_int_equal(vd_pread(bs, 3, 75000, rd + 3), 0);
    for (int i = 3; i < 75003; i++) {
        uint8_t want = 0;
        if (i >= 512 && i < 515) {
            want = (uint8_t)"xyz"[i - 512];
        } else if (i >= 1001 && i < 71000) {
            want = buf[i - 1000];
        }
        if (rd[i] != want) {
            fail_msg("direct byte %d = %#x want %#x", i, rd[i], want);
        }
    }
    /* Unaligned write at the very end must not grow the file to a block boundary. */
    assert_int_equal(vd_pwrite(bs->file, (1 << 20) + 10, 5, "abcde", 0), 0);
    struct stat st;
    assert_int_equal(stat("d.raw", &st), 0);
    assert_int_equal(st.st_size, (1 << 20) + 15);
    assert_int_equal(vd_getlength(bs->file), (1 << 20) + 512);
    free(buf);
    free(rd);
    vd_node_unref(bs);
}

/*
 * O_DIRECT bounce buffers are per thread and sized to the request: a small request, then one
 * larger than the 1 MiB bounce cap (split), then a small one again must all round-trip.
 */
static void test_direct_bounce_sizes(void **state)
{
    make_raw("db.raw", 4 << 20);
    VdError *err = NULL;
    BlockNode *bs = vd_open_image("db.raw", "raw", VD_OPEN_RDWR | VD_OPEN_DIRECT, &err);
    if (!bs) {
        vd_error_free(err);
        skip();
    }
    BlockNode *f = bs->file;
    const size_t big = (5u << 19) + 777; /* 2.5 MiB + 777 */
    uint8_t *buf = malloc(big + 1), *rd = malloc(big + 1);
    assert_non_null(buf);
    assert_non_null(rd);
    for (size_t i = 0; i <= big; i++) {
        buf[i] = (uint8_t)(i * 13 + 5);
    }
    assert_int_equal(vd_pwrite(f, 4097, 100, buf + 1, 0), 0);       /* small, RMW */
    assert_int_equal(vd_pwrite(f, 70001, big, buf + 1, 0), 0);      /* big, split */
    assert_int_equal(vd_pwrite(f, 8192, 4096, buf + 1, 0), 0);      /* aligned range, odd buf */
    assert_int_equal(vd_pread(f, 70001, big, rd + 1), 0);
    assert_memory_equal(rd + 1, buf + 1, big);
    assert_int_equal(vd_pread(f, 4097, 100, rd + 1), 0);
    assert_memory_equal(rd + 1, buf + 1, 100);
    assert_int_equal(vd_pread(f, 8192, 4096, rd + 1), 0);
    assert_memory_equal(rd + 1, buf + 1, 4096);
    /* aligned everything: no bounce at all */
    uint8_t *al = NULL;
    assert_int_equal(posix_memalign((void **)&al, 4096, 8192), 0);
    memcpy(al, buf, 8192);
    assert_int_equal(vd_pwrite(f, 1 << 20, 8192, al, 0), 0);
    memset(al, 0, 8192);
    assert_int_equal(vd_pread(f, 1 << 20, 8192, al), 0);
    assert_memory_equal(al, buf, 8192);
    free(al);
    free(buf);
    free(rd);
    vd_node_unref(bs);
}

/* Concurrent unaligned O_DIRECT writes into the same 4 KiB blocks must not lose each other's
 * bytes (each one is a read-modify-write of whole blocks). */
typedef struct DirectWriter {
    BlockNode *bs;
    int id;
    int ret;
} DirectWriter;

#define DW_THREADS 4
#define DW_PIECE 100
#define DW_ROUNDS 200

static void *direct_writer(void *opaque)
{
    DirectWriter *w = opaque;
    uint8_t piece[DW_PIECE];
    memset(piece, 0x10 + w->id, sizeof(piece));
    for (int r = 0; r < DW_ROUNDS && w->ret == 0; r++) {
        /* Pieces of all threads interleave: thread t owns pieces r*DW_THREADS + t. */
        uint64_t off = (uint64_t)(r * DW_THREADS + w->id) * DW_PIECE;
        w->ret = vd_pwrite(w->bs, off, DW_PIECE, piece, 0);
    }
    return NULL;
}

static void test_direct_concurrent_rmw(void **state)
{
    make_raw("dc.raw", 1 << 20);
    VdError *err = NULL;
    BlockNode *bs = vd_open_image("dc.raw", "raw", VD_OPEN_RDWR | VD_OPEN_DIRECT, &err);
    if (!bs) {
        vd_error_free(err);
        skip();
    }
    pthread_t th[DW_THREADS];
    DirectWriter w[DW_THREADS];
    for (int t = 0; t < DW_THREADS; t++) {
        w[t] = (DirectWriter){ .bs = bs, .id = t };
        assert_int_equal(pthread_create(&th[t], NULL, direct_writer, &w[t]), 0);
    }
    for (int t = 0; t < DW_THREADS; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(w[t].ret, 0);
    }
    vd_node_unref(bs);
    bs = open_ok("dc.raw", "raw", 0);
    for (int piece = 0; piece < DW_ROUNDS * DW_THREADS; piece++) {
        expect_bytes(bs, (uint64_t)piece * DW_PIECE, DW_PIECE, 0x10 + piece % DW_THREADS);
    }
    vd_node_unref(bs);
}

static void test_zero_emulation(void **state)
{
    make_tc("z.tc", 65536, NULL, NULL);
    BlockNode *bs = open_ok("z.tc", "testcow", VD_OPEN_RDWR);
    fill(bs, 0, 65536, 0x44);
    /* testcow has no write_zeroes: emulated with zero writes... */
    assert_int_equal(vd_pwrite_zeroes(bs, 1000, 20000, 0), 0);
    expect_bytes(bs, 1000, 20000, 0);
    expect_bytes(bs, 0, 1000, 0x44);
    expect_bytes(bs, 21000, 1000, 0x44);
    /* ...unless the caller wants only fast zeroing. */
    assert_int_equal(vd_pwrite_zeroes(bs, 30000, 100, VD_REQ_NO_FALLBACK), -ENOTSUP);
    expect_bytes(bs, 30000, 100, 0x44);
    /* Discard without driver support is a successful no-op. */
    assert_int_equal(vd_pdiscard(bs, 0, 4096, 0), 0);
    expect_bytes(bs, 0, 1000, 0x44);
    vd_node_unref(bs);
}

/* ------------------------------------------------------------------------------------------ */
/* chains */

static void test_chain_relative_resolution(void **state)
{
    /* images/top -> ../bases/mid (recorded relative to images/) -> base.raw (relative to bases/) */
    assert_int_equal(mkdir("images", 0755), 0);
    assert_int_equal(mkdir("bases", 0755), 0);
    make_raw("bases/base.raw", 1 << 20);
    make_tc("bases/mid.tc", 1 << 20, "base.raw", "raw");
    make_tc("images/top.tc", 1 << 20, "../bases/mid.tc", "testcow");

    BlockNode *top = open_ok("images/top.tc", "testcow", VD_OPEN_RDWR);
    assert_non_null(top->backing);
    assert_non_null(top->backing->backing);
    assert_null(top->backing->backing->backing);
    assert_string_equal(top->backing_file, "../bases/mid.tc");
    assert_string_equal(top->full_backing_filename, "images/../bases/mid.tc");
    assert_string_equal(top->backing->filename, "images/../bases/mid.tc");
    assert_string_equal(top->backing->full_backing_filename, "images/../bases/base.raw");
    assert_string_equal(top->backing->backing->drv->name, "raw");
    /* Backing nodes are read-only even when the top is writable. */
    assert_false(top->read_only);
    assert_true(top->backing->read_only);
    assert_true(top->backing->backing->read_only);
    assert_int_equal(vd_pwrite(top->backing, 0, 1, "x", 0), -EPERM);
    assert_int_equal(vd_chain_depth(top, top->backing->backing), 2);
    assert_int_equal(vd_chain_depth(top, top), 0);
    assert_ptr_equal(vd_chain_bottom(top), top->backing->backing);
    assert_ptr_equal(vd_chain_find(top, "bases/base.raw"), top->backing->backing);
    assert_ptr_equal(vd_chain_find(top, "../bases/mid.tc"), top->backing);
    assert_ptr_equal(vd_chain_find(top, top->backing->node_name), top->backing);
    assert_null(vd_chain_find(top, "nope"));
    /* Relative to the image naming it ("base.raw" is what mid records; "../bases/base.raw"
     * is how top's directory would say it). */
    assert_ptr_equal(vd_chain_find(top, "base.raw"), top->backing->backing);
    assert_ptr_equal(vd_chain_find(top, "../bases/base.raw"), top->backing->backing);
    assert_true(top->node_name[0] == '#');
    assert_string_not_equal(top->node_name, top->backing->node_name);
    vd_node_unref(top);

    /* Opened from another working directory, the names still resolve against the image. */
    assert_int_equal(chdir("images"), 0);
    top = open_ok("top.tc", "testcow", 0);
    assert_non_null(top->backing->backing);
    vd_node_unref(top);
    assert_int_equal(chdir(".."), 0);
}

/* opts->backing / opts->file replace what the header names; set_backing swaps in memory. */
static void test_open_overrides(void **state)
{
    make_raw("ov-a.raw", 65536);
    make_raw("ov-b.raw", 65536);
    BlockNode *a = open_ok("ov-a.raw", "raw", VD_OPEN_RDWR);
    fill(a, 0, 65536, 0xaa);
    BlockNode *b = open_ok("ov-b.raw", "raw", VD_OPEN_RDWR);
    fill(b, 0, 65536, 0xbb);
    make_tc("ov-top.tc", 65536, "missing-anyway.raw", "raw");

    /* The header's (missing) backing is not opened when a node is given. */
    VdOpenOptions o = { .filename = "ov-top.tc", .format = "testcow", .backing = a,
                        .node_name = "mytop" };
    VdError *err = NULL;
    BlockNode *top = vd_open(&o, &err);
    assert_non_null(top);
    assert_string_equal(top->node_name, "mytop");
    assert_ptr_equal(top->backing, a);
    assert_int_equal(a->refcnt, 2);
    expect_bytes(top, 0, 65536, 0xaa);
    /* Swap the backing in memory: reads follow, refcounts move, the header is untouched. */
    vd_node_set_backing(top, b);
    assert_int_equal(a->refcnt, 1);
    assert_int_equal(b->refcnt, 2);
    expect_bytes(top, 0, 65536, 0xbb);
    assert_string_equal(top->backing_file, "missing-anyway.raw");
    vd_node_set_backing(top, NULL);
    assert_int_equal(b->refcnt, 1);
    expect_bytes(top, 0, 65536, 0);
    vd_node_unref(top);

    /* A given protocol node is used as the file child. */
    BlockNode *f = open_ok("ov-b.raw", "file", 0);
    VdOpenOptions of = { .format = "raw", .file = f };
    BlockNode *r = vd_open(&of, &err);
    assert_non_null(r);
    assert_ptr_equal(r->file, f);
    assert_string_equal(r->filename, "ov-b.raw");
    expect_bytes(r, 0, 65536, 0xbb);
    vd_node_unref(f);
    vd_node_unref(r);
    vd_node_unref(a);
    vd_node_unref(b);
}

static void test_chain_missing_backing(void **state)
{
    make_tc("orphan.tc", 65536, "gone.raw", "raw");
    int code = open_fails("orphan.tc", "testcow", 0, "gone.raw");
    assert_int_equal(code, ENOENT);
    /* Without the chain it opens. */
    BlockNode *bs = open_ok("orphan.tc", "testcow", VD_OPEN_NO_BACKING);
    assert_null(bs->backing);
    assert_string_equal(bs->backing_file, "gone.raw");
    /* With no backing node, unallocated reads and status are zero. */
    expect_bytes(bs, 0, 65536, 0);
    uint64_t pnum;
    VdBlockStatus st;
    assert_int_equal(vd_block_status_above(bs, NULL, 0, 65536, &pnum, &st), 0);
    assert_int_equal(pnum, 65536);
    assert_int_equal(st.flags, VD_BS_ZERO);
    vd_node_unref(bs);
}

static void test_chain_loop(void **state)
{
    make_tc("loop-a.tc", 65536, "loop-b.tc", "testcow");
    make_tc("loop-b.tc", 65536, "./loop-a.tc", "testcow");
    int code = open_fails("loop-a.tc", "testcow", 0, "loop-a.tc");
    assert_int_equal(code, ELOOP);
    /* Self-loop via a symlink spelling. */
    assert_int_equal(symlink("self.tc", "self-link.tc"), 0);
    make_tc("self.tc", 65536, "self-link.tc", "testcow");
    code = open_fails("self.tc", "testcow", 0, "self-link.tc");
    assert_int_equal(code, ELOOP);
}

static void test_chain_no_probe(void **state)
{
    /* Such images come from old tools: write them with the driver directly (vd_create, like
     * qemu-img >= 6.1, insists on a backing format). */
    VdCreateOptions o = { .format = "testcow", .size = 65536, .size_given = true,
                          .backing_file = "np-base.raw" };
    make_raw("np-base.raw", 65536);
    assert_int_equal(tc_create("np-top.tc", &o, NULL), 0);
    /* A backing file without a recorded format is not probed... */
    int code = open_fails("np-top.tc", "testcow", 0, "-F");
    assert_int_not_equal(code, 0);
    /* ...unless the caller allows it. */
    BlockNode *bs = open_ok("np-top.tc", "testcow", VD_OPEN_ALLOW_PROBE);
    assert_non_null(bs->backing);
    assert_string_equal(bs->backing->drv->name, "raw");
    vd_node_unref(bs);
    /* A raw file holding a testcow header must not become testcow through probing. */
    make_tc("np-evil.tc", 65536, "/etc/passwd", "raw");
    o.backing_file = "np-evil.tc";
    assert_int_equal(tc_create("np-top2.tc", &o, NULL), 0);
    open_fails("np-top2.tc", "testcow", 0, "no recorded format");
    /* After recording the format (rebase -u), it opens without probing. */
    bs = open_ok("np-top.tc", "testcow", VD_OPEN_RDWR | VD_OPEN_NO_BACKING);
    VdError *err = NULL;
    assert_int_equal(vd_change_backing_file(bs, "np-base.raw", "raw", &err), 0);
    assert_string_equal(bs->backing_format, "raw");
    vd_node_unref(bs);
    bs = open_ok("np-top.tc", "testcow", 0);
    assert_string_equal(bs->backing->drv->name, "raw");
    vd_node_unref(bs);
}

static void test_create_with_backing(void **state)
{
    make_raw("cb-base.raw", 3 * 65536);
    /* No backing format: refused, like qemu-img >= 6.1. */
    VdCreateOptions o = { .format = "testcow", .backing_file = "cb-base.raw" };
    VdError *err = NULL;
    assert_true(vd_create(&o, "cb-top.tc", &err) < 0);
    assert_non_null(strstr(vd_error_msg(err), "backing format"));
    vd_error_free(err);
    err = NULL;
    /* Size 0 takes the backing's size, resolved relative to the new image. */
    assert_int_equal(mkdir("cbdir", 0755), 0);
    make_raw("cbdir/b.raw", 5 * 65536);
    o.backing_file = "b.raw";
    o.backing_fmt = "raw";
    assert_int_equal(vd_create(&o, "cbdir/top.tc", &err), 0);
    BlockNode *bs = open_ok("cbdir/top.tc", NULL, 0);
    assert_int_equal(vd_getlength(bs), 5 * 65536);
    vd_node_unref(bs);
    /* A missing backing file fails unless unsafe. */
    o.backing_file = "missing.raw";
    assert_true(vd_create(&o, "cb2.tc", &err) < 0);
    assert_non_null(strstr(vd_error_msg(err), "missing.raw"));
    vd_error_free(err);
    err = NULL;
    o.unsafe = true;
    o.size = 65536;
    o.size_given = true;
    assert_int_equal(vd_create(&o, "cb2.tc", &err), 0);
    /* Sizes round up to whole sectors, as qemu-img does. */
    make_raw("odd.raw", 3000000);
    struct stat sb;
    assert_int_equal(stat("odd.raw", &sb), 0);
    assert_int_equal(sb.st_size, 3000320);
    /* Raw has no backing. */
    VdCreateOptions r = { .format = "raw", .size = 4096, .size_given = true,
                          .backing_file = "cb-base.raw", .backing_fmt = "raw" };
    assert_true(vd_create(&r, "cb3.raw", &err) < 0);
    vd_error_free(err);
}

/* ------------------------------------------------------------------------------------------ */
/* block status */

static void test_status_above_chain(void **state)
{
    /*
     * base.raw (1 MiB): data in [0, 64K) and [256K, 320K), rest a hole.
     * mid.tc   (1 MiB): blocks at [64K, 72K) and [256K, 260K).
     * top.tc   (2 MiB): blocks at [0, 4K) and [1M+4K, 1M+8K); [1M, 2M) is past mid's end.
     */
    make_raw("s-base.raw", 1 << 20);
    BlockNode *b = open_ok("s-base.raw", "raw", VD_OPEN_RDWR);
    fill(b, 0, 65536, 0xb0);
    fill(b, 262144, 65536, 0xb1);
    vd_node_unref(b);
    make_tc("s-mid.tc", 1 << 20, "s-base.raw", "raw");
    BlockNode *m = open_ok("s-mid.tc", NULL, VD_OPEN_RDWR);
    fill(m, 65536, 8192, 0xc0);
    fill(m, 262144, 4096, 0xc1);
    vd_node_unref(m);
    make_tc("s-top.tc", 2 << 20, "s-mid.tc", "testcow");
    BlockNode *top = open_ok("s-top.tc", NULL, VD_OPEN_RDWR);
    fill(top, 0, 4096, 0xd0);
    fill(top, (1 << 20) + 4096, 4096, 0xd1);
    BlockNode *mid = top->backing, *base = mid->backing;

    /* Content through the chain. */
    expect_bytes(top, 0, 4096, 0xd0);
    expect_bytes(top, 4096, 61440, 0xb0);
    expect_bytes(top, 65536, 8192, 0xc0);
    expect_bytes(top, 262144, 4096, 0xc1);
    expect_bytes(top, 266240, 61440, 0xb1);
    expect_bytes(top, 1 << 20, 4096, 0);
    expect_bytes(top, (1 << 20) + 4096, 4096, 0xd1);

    uint64_t pnum;
    VdBlockStatus st;
    /* Whole chain. */
    assert_int_equal(vd_block_status_above(top, NULL, 0, 2 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 4096);
    assert_int_equal(st.flags & (VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_ZERO),
                     VD_BS_ALLOCATED | VD_BS_DATA);
    assert_int_equal(st.depth, 0);
    assert_ptr_equal(st.layer, top);
    assert_true(st.flags & VD_BS_OFFSET_VALID);
    assert_ptr_equal(st.file, top->file);
    assert_int_equal(st.offset, 4096); /* testcow block 0 lives at 4K */

    /* Falls to base's data: clipped to mid's unallocated extent and base's data extent. */
    assert_int_equal(vd_block_status_above(top, NULL, 4096, 2 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 61440);
    assert_int_equal(st.depth, 2);
    assert_ptr_equal(st.layer, base);
    assert_int_equal(st.flags, VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_OFFSET_VALID);
    assert_int_equal(st.offset, 4096);
    assert_ptr_equal(st.file, base->file);

    assert_int_equal(vd_block_status_above(top, NULL, 65536, 2 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 8192);
    assert_int_equal(st.depth, 1);
    assert_ptr_equal(st.layer, mid);

    /* base's hole is allocated in base (raw decides) and zero. */
    assert_int_equal(vd_block_status_above(top, NULL, 73728, 2 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 262144 - 73728);
    assert_int_equal(st.depth, 2);
    assert_int_equal(st.flags & (VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_ZERO),
                     VD_BS_ALLOCATED | VD_BS_ZERO);

    /* Past mid's end: top defers, the chain ends: zero, unallocated, one layer visited. */
    assert_int_equal(vd_block_status_above(top, NULL, 1 << 20, 1 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 4096);
    assert_int_equal(st.flags, VD_BS_ZERO);
    assert_int_equal(st.depth, 1);
    assert_null(st.layer);
    assert_int_equal(vd_block_status_above(top, NULL, (1 << 20) + 8192, 1 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, (1 << 20) - 8192); /* clipped to the image end */
    assert_int_equal(st.flags, VD_BS_ZERO);

    /* Above base = mid: base's ranges are "not allocated" (shared base, live copy skips). */
    assert_int_equal(vd_block_status_above(top, base, 4096, 2 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 61440);
    assert_int_equal(st.flags & VD_BS_ALLOCATED, 0);
    assert_int_equal(st.flags & VD_BS_ZERO, 0);
    assert_int_equal(st.depth, 2);
    assert_null(st.layer);
    assert_int_equal(vd_is_allocated_above(top, base, 4096, 2 << 20, &pnum), 0);
    assert_int_equal(vd_is_allocated_above(top, base, 65536, 2 << 20, &pnum), 1);
    assert_int_equal(pnum, 8192);
    /* Above mid: only top counts. */
    assert_int_equal(vd_is_allocated_above(top, mid, 65536, 2 << 20, &pnum), 0);
    assert_int_equal(pnum, (1 << 20) - 65536);
    assert_int_equal(vd_is_allocated_above(top, top, 0, 4096, &pnum), 0);

    /* Extents walk the whole image with no gaps and each one has one status. */
    uint64_t off = 0, n_ext = 0;
    while (off < (2u << 20)) {
        assert_int_equal(vd_block_status_above(top, NULL, off, (2u << 20) - off, &pnum, &st), 0);
        assert_true(pnum > 0);
        off += pnum;
        n_ext++;
    }
    assert_int_equal(off, 2u << 20);
    /* top d0 | base b0 | mid c0 | base zero | mid c1 | base b1 | base zero | past-end zero |
     * top d1 | past-end zero */
    assert_int_equal(n_ext, 10);

    /* Single-layer status on an unallocated range with backing: neither allocated nor zero. */
    assert_int_equal(vd_block_status(top, 4096, 8192, &pnum, &st), 0);
    assert_int_equal(st.flags, 0);
    assert_int_equal(pnum, 8192);
    /* Range errors. */
    assert_int_equal(vd_block_status(top, 2 << 20, 1, &pnum, &st), -EINVAL);
    vd_node_unref(top);
}

static json_t *run_json(const char *cmd);

/* ------------------------------------------------------------------------------------------ */
/* qcow2 chains made by qemu-img, checked against qemu-img map (skipped without qcow2 or qemu) */

static bool have_qemu_and_qcow2(void)
{
    return vd_find_driver("qcow2") && system("qemu-img --version >/dev/null 2>&1") == 0 &&
           system("qemu-io --version >/dev/null 2>&1") == 0;
}

static void sh(const char *cmd)
{
    if (system(cmd) != 0) {
        fail_msg("command failed: %s", cmd);
    }
}

/*
 * For every 4 KiB block, our chain status must say what qemu-img map says: present (allocated
 * somewhere), zero, data, depth (qemu reports the last layer visited for unallocated ranges,
 * which is our depth - 1) and the host offset.
 */
static void compare_with_qemu_map(const char *image, uint64_t size)
{
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "qemu-img map -U --output=json '%s'", image);
    json_t *qmap = run_json(cmd);
    assert_non_null(qmap);
    BlockNode *top = open_ok(image, NULL, 0);
    assert_int_equal(vd_getlength(top), size);
    size_t qi = 0;
    for (uint64_t off = 0; off < size; off += 4096) {
        json_t *e = json_array_get(qmap, qi);
        while (e && (uint64_t)(json_integer_value(json_object_get(e, "start")) +
                               json_integer_value(json_object_get(e, "length"))) <= off) {
            e = json_array_get(qmap, ++qi);
        }
        assert_non_null(e);
        uint64_t start = (uint64_t)json_integer_value(json_object_get(e, "start"));
        uint64_t pnum;
        VdBlockStatus st;
        assert_int_equal(vd_block_status_above(top, NULL, off, 4096, &pnum, &st), 0);
        assert_int_equal(pnum, 4096);
        bool present = json_is_true(json_object_get(e, "present"));
        bool zero = json_is_true(json_object_get(e, "zero"));
        bool data = json_is_true(json_object_get(e, "data"));
        int qdepth = (int)json_integer_value(json_object_get(e, "depth"));
        if (present != !!(st.flags & VD_BS_ALLOCATED) || zero != !!(st.flags & VD_BS_ZERO) ||
            data != !!(st.flags & VD_BS_DATA) || qdepth != (present ? st.depth : st.depth - 1)) {
            fail_msg("%s @%llu: qemu present=%d zero=%d data=%d depth=%d; ours flags=%#x "
                     "depth=%d", image, (unsigned long long)off, present, zero, data, qdepth,
                     st.flags, st.depth);
        }
        json_t *qoff = json_object_get(e, "offset");
        assert_int_equal(qoff != NULL, !!(st.flags & VD_BS_OFFSET_VALID));
        if (qoff) {
            assert_int_equal(st.offset, (uint64_t)json_integer_value(qoff) + (off - start));
        }
    }
    vd_node_unref(top);
    json_decref(qmap);
}

static void test_qcow2_chain_vs_qemu_map(void **state)
{
    if (!have_qemu_and_qcow2()) {
        skip();
    }
    assert_int_equal(mkdir("q", 0755), 0);
    /* base.raw (sparse, some data) <- mid.qcow2 (1.5M) <- top.qcow2 (3M), names relative. */
    sh("truncate -s 2M q/base.raw && qemu-io -f raw -c 'write -P 1 0 192k' "
       "-c 'write -P 2 1M 64k' q/base.raw >/dev/null");
    sh("qemu-img create -q -f qcow2 -b base.raw -F raw q/mid.qcow2 1536k");
    sh("qemu-io -f qcow2 -c 'write -P 3 64k 64k' -c 'write -z 256k 128k' "
       "-c 'write -P 4 1M 4k' q/mid.qcow2 >/dev/null");
    sh("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 q/top.qcow2 3M");
    sh("qemu-io -f qcow2 -c 'write -P 5 0 4k' -c 'write -P 6 2M 64k' -c 'write -z 2560k 64k' "
       "q/top.qcow2 >/dev/null");
    compare_with_qemu_map("q/top.qcow2", 3 << 20);
    compare_with_qemu_map("q/mid.qcow2", 1536 << 10);
    compare_with_qemu_map("q/base.raw", 2 << 20);

    /* Content through the chain. */
    BlockNode *top = open_ok("q/top.qcow2", NULL, 0);
    expect_bytes(top, 0, 4096, 5);
    expect_bytes(top, 4096, 61440, 1);
    expect_bytes(top, 65536, 65536, 3);
    expect_bytes(top, 131072, 65536, 1);
    expect_bytes(top, 256 << 10, 128 << 10, 0);
    expect_bytes(top, 1 << 20, 4096, 4);
    expect_bytes(top, (1 << 20) + 4096, 61440, 2);
    expect_bytes(top, 1536 << 10, 512 << 10, 0); /* past mid's end */
    expect_bytes(top, 2 << 20, 65536, 6);
    /* Above base = mid: only top's clusters count; mid and base are "shared". */
    uint64_t pnum;
    assert_int_equal(vd_is_allocated_above(top, top->backing, 0, 3 << 20, &pnum), 1);
    assert_int_equal(pnum, 65536); /* qcow2 allocates whole clusters */
    assert_int_equal(vd_is_allocated_above(top, top->backing, 65536, 3 << 20, &pnum), 0);
    assert_int_equal(pnum, (1536 << 10) - 65536); /* then past mid's end: zero, a new extent */
    VdBlockStatus st;
    assert_int_equal(vd_block_status_above(top, top->backing, 1536 << 10, 3 << 20, &pnum, &st), 0);
    assert_int_equal(pnum, 512 << 10);
    assert_int_equal(st.flags, VD_BS_ZERO);
    vd_node_unref(top);

    /* An empty image is one long zero extent (fast map/convert). */
    sh("qemu-img create -q -f qcow2 q/empty.qcow2 1G");
    BlockNode *e = open_ok("q/empty.qcow2", NULL, 0);
    assert_int_equal(vd_block_status_above(e, NULL, 0, 1ULL << 30, &pnum, &st), 0);
    assert_int_equal(pnum, 1ULL << 30);
    assert_int_equal(st.flags, VD_BS_ZERO);
    vd_node_unref(e);
}

static void test_qcow2_info_vs_qemu(void **state)
{
    if (!have_qemu_and_qcow2()) {
        skip();
    }
    assert_int_equal(mkdir("qi", 0755), 0);
    sh("qemu-img create -q -f qcow2 qi/base.qcow2 1M");
    sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 qi/top.qcow2 2M");
    sh("qemu-io -f qcow2 -c 'write 0 64k' qi/top.qcow2 >/dev/null");
    const char *imgs[] = { "qi/top.qcow2", "qi/base.qcow2" };
    for (int i = 0; i < 2; i++) {
        char cmd[256];
        snprintf(cmd, sizeof(cmd), "qemu-img info -U --output=json '%s'", imgs[i]);
        json_t *q = run_json(cmd);
        assert_non_null(q);
        BlockNode *bs = open_ok(imgs[i], NULL, 0);
        VdError *err = NULL;
        json_t *mine = vd_image_info(bs, &err);
        assert_non_null(mine);
        if (!json_equal(mine, q)) {
            char *a = json_dumps(mine, JSON_SORT_KEYS), *b = json_dumps(q, JSON_SORT_KEYS);
            fail_msg("info differs:\n mine %s\n qemu %s", a, b);
        }
        json_decref(mine);
        json_decref(q);
        vd_node_unref(bs);
    }
}

/* Image locks: another process holding an image for writing keeps metadata formats from being
 * opened (QEMU's rules), raw readers still may, -U skips locking, this process may reopen. */
static void test_image_locking(void **state)
{
    make_tc("lk.tc", 65536, NULL, NULL);
    make_raw("lk.raw", 65536);
    int to_child[2], to_parent[2];
    assert_int_equal(pipe(to_child), 0);
    assert_int_equal(pipe(to_parent), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        VdError *err = NULL;
        BlockNode *a = vd_open_image("lk.tc", "testcow", VD_OPEN_RDWR, &err);
        BlockNode *b = vd_open_image("lk.raw", "raw", VD_OPEN_RDWR, &err);
        char c = (a && b) ? 'y' : 'n';
        if (write(to_parent[1], &c, 1) != 1 || read(to_child[0], &c, 1) != 1) {
            _exit(2);
        }
        _exit(0); /* exiting drops the locks */
    }
    char c = 0;
    assert_int_equal(read(to_parent[0], &c, 1), 1);
    assert_int_equal(c, 'y');

    /* A format reader must not see metadata change under it. */
    int code = open_fails("lk.tc", "testcow", 0, "shared \"write\" lock");
    assert_int_equal(code, EAGAIN);
    open_fails("lk.tc", "testcow", VD_OPEN_RDWR, "lock");
    /* Raw readers share writes (as qemu-img does for raw). */
    BlockNode *r = open_ok("lk.raw", "raw", 0);
    vd_node_unref(r);
    /* -U opens anyway. */
    BlockNode *u = open_ok("lk.tc", "testcow", VD_OPEN_FORCE_SHARE);
    vd_node_unref(u);
    /* Creating over an image in use is refused and leaves it intact. */
    VdCreateOptions co = { .format = "raw", .size = 512, .size_given = true };
    VdError *err = NULL;
    assert_int_equal(vd_create(&co, "lk.tc", &err), -EAGAIN);
    assert_non_null(strstr(vd_error_msg(err), "lock"));
    vd_error_free(err);
    struct stat sb;
    assert_int_equal(stat("lk.tc", &sb), 0);
    assert_int_equal(sb.st_size, 4096);

    assert_int_equal(write(to_child[1], "x", 1), 1);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    /* Within one process, reopening read-write an image held read-only works (commit does it). */
    BlockNode *ro = open_ok("lk.tc", "testcow", 0);
    BlockNode *rw = open_ok("lk.tc", "testcow", VD_OPEN_RDWR);
    vd_node_unref(rw);
    vd_node_unref(ro);
    close(to_child[0]);
    close(to_child[1]);
    close(to_parent[0]);
    close(to_parent[1]);
}

/* Run a command and parse its stdout as JSON; NULL (test skipped) if the tool is missing. */
static json_t *run_json(const char *cmd)
{
    FILE *p = popen(cmd, "r");
    if (!p) {
        return NULL;
    }
    json_error_t jerr;
    json_t *j = json_loadf(p, 0, &jerr);
    pclose(p);
    return j;
}

/* VD_BS_RECURSE: allocated data whose host range is a hole in the file reads as zero. */
static void test_status_recurse(void **state)
{
    make_tc("rc.tc", 65536, NULL, NULL);
    BlockNode *bs = open_ok("rc.tc", "testcow", VD_OPEN_RDWR);
    fill(bs, 0, 3 * 4096, 0x21);
    /* Punch guest block 1's host range (file offset 2*4K): the data there now reads zero. */
    assert_int_equal(vd_pdiscard(bs->file, 2 * 4096, 4096, 0), 0);
    uint64_t pnum;
    VdBlockStatus st;
    tc_recurse = true;
    assert_int_equal(vd_block_status_above(bs, NULL, 0, 65536, &pnum, &st), 0);
    assert_int_equal(pnum, 4096);
    assert_int_equal(st.flags, VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_OFFSET_VALID);
    assert_int_equal(vd_block_status_above(bs, NULL, 4096, 65536, &pnum, &st), 0);
    assert_int_equal(pnum, 4096);
    assert_int_equal(st.flags, VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_ZERO | VD_BS_OFFSET_VALID);
    assert_int_equal(st.offset, 2 * 4096);
    assert_int_equal(vd_block_status_above(bs, NULL, 8192, 65536, &pnum, &st), 0);
    assert_int_equal(st.flags & VD_BS_ZERO, 0);
    /* Without the flag, the layer's own answer stands. */
    tc_recurse = false;
    assert_int_equal(vd_block_status_above(bs, NULL, 4096, 65536, &pnum, &st), 0);
    assert_int_equal(pnum, 3 * 4096 - 4096);
    assert_int_equal(st.flags, VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_OFFSET_VALID);
    vd_node_unref(bs);
}

static void test_info_json_raw(void **state)
{
    make_raw("i.raw", 3 << 20);
    BlockNode *bs = open_ok("i.raw", "raw", VD_OPEN_RDWR);
    fill(bs, 65536, 65536, 0x12);
    assert_int_equal(vd_flush(bs), 0);
    VdError *err = NULL;
    json_t *mine = vd_image_info(bs, &err);
    assert_non_null(mine);
    vd_node_unref(bs);
    json_t *q = run_json("qemu-img info -U --output=json i.raw 2>/dev/null");
    if (!q) {
        json_decref(mine);
        skip();
    }
    if (!json_equal(mine, q)) {
        char *a = json_dumps(mine, JSON_SORT_KEYS), *b = json_dumps(q, JSON_SORT_KEYS);
        fail_msg("info differs:\n mine %s\n qemu %s", a, b);
    }
    assert_int_equal(json_integer_value(json_object_get(mine, "virtual-size")), 3 << 20);
    json_decref(mine);
    json_decref(q);
}

/* ------------------------------------------------------------------------------------------ */

int main(void)
{
    vd_log_set_level(VD_LOG_ERROR); /* the probed-raw warning is expected here */
    if (vd_register_driver(&tc_drv) < 0 || vd_register_driver(&mem_drv) < 0) {
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resolve_backing_path),
        cmocka_unit_test(test_relative_path),
        cmocka_unit_test(test_raw_io_and_ranges),
        cmocka_unit_test(test_probe),
        cmocka_unit_test(test_protocol_by_scheme),
        cmocka_unit_test(test_new_protocol_carries_formats),
        cmocka_unit_test(test_file_protocol),
        cmocka_unit_test(test_start_writeback),
        cmocka_unit_test(test_direct_io),
        cmocka_unit_test(test_direct_concurrent_rmw),
        cmocka_unit_test(test_direct_bounce_sizes),
        cmocka_unit_test(test_zero_emulation),
        cmocka_unit_test(test_chain_relative_resolution),
        cmocka_unit_test(test_open_overrides),
        cmocka_unit_test(test_chain_missing_backing),
        cmocka_unit_test(test_chain_loop),
        cmocka_unit_test(test_chain_no_probe),
        cmocka_unit_test(test_create_with_backing),
        cmocka_unit_test(test_status_above_chain),
        cmocka_unit_test(test_status_recurse),
        cmocka_unit_test(test_open_no_flush),
        cmocka_unit_test(test_info_json_raw),
        cmocka_unit_test(test_image_locking),
        cmocka_unit_test(test_qcow2_chain_vs_qemu_map),
        cmocka_unit_test(test_qcow2_info_vs_qemu),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
