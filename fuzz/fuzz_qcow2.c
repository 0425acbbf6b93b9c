/*
 * fuzz_qcow2.c - libFuzzer target: the input is an image file opened as qcow2 and read: header,
 * extensions, L1/L2, refcounts, compressed clusters, block status and the read-only check.
 * Promise under test: any bytes give an error or data, never a crash, a hang or a sanitizer
 * report; the file is never written (opened read-only).
 *
 * The file is the input itself, served by a protocol driver of this harness ("fuzzmem://"): no
 * system call per input (a memfd cost an open, fstats, fcntls and preads each time), reads past
 * the end give zeroes as a host file's do. The check runs quiet (VD_CHECK_QUIET): its per-problem
 * lines on stderr were 70 write()s per input and test nothing.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/block.h"
#include "formats/qcow2-format.h"

#define MAX_READ (4u << 20) /* bytes of the virtual disk read per input */
/*
 * An active L1 or refcount table this much larger than the input lies mostly past its end, so
 * the check loads and walks megabytes of zeroes (1 to 2 s per input under ASan): nothing a table
 * that ends a little past the end does not reach. Such inputs are skipped.
 */
#define TABLE_SLACK (256u << 10)

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t *cur_data; /* the input being run: the file fuzzmem:// opens */
static size_t cur_size;

static int mem_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    return 0;
}

static int mem_pread(BlockNode *bs, uint64_t off, uint64_t n, void *buf)
{
    uint64_t avail = off < cur_size ? cur_size - off : 0;
    if (avail > n) {
        avail = n;
    }
    memcpy(buf, cur_data + off, avail);
    memset((uint8_t *)buf + avail, 0, n - avail);
    return 0;
}

static int mem_pwrite(BlockNode *bs, uint64_t off, uint64_t n, const void *buf, int flags)
{
    abort(); /* the image is opened read-only: a write is a bug */
}

/* As a host file of these bytes: data up to the end, a hole after it. */
static int mem_block_status(BlockNode *bs, uint64_t off, uint64_t n, uint64_t *pnum,
                            uint64_t *map, BlockNode **file)
{
    *map = off;
    *file = bs;
    if (off >= cur_size) {
        *pnum = n;
        return VD_BS_ALLOCATED | VD_BS_OFFSET_VALID | VD_BS_ZERO;
    }
    *pnum = cur_size - off < n ? cur_size - off : n;
    return VD_BS_ALLOCATED | VD_BS_OFFSET_VALID | VD_BS_DATA;
}

static int64_t mem_getlength(BlockNode *bs)
{
    return (int64_t)cur_size;
}

/* What a memfd of these bytes occupies (qcow2 compares it with its refcounts: preallocation). */
static int64_t mem_allocated_size(BlockNode *bs)
{
    return (int64_t)((cur_size + 4095) & ~(size_t)4095);
}

static const char *const mem_schemes[] = {"fuzzmem", NULL};

static const BlockDriver mem_drv = {
    .name = "fuzzmem",
    .is_protocol = true,
    .uri_schemes = mem_schemes,
    .reads_zero_past_end = true,
    .open = mem_open,
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .block_status = mem_block_status,
    .getlength = mem_getlength,
    .allocated_size = mem_allocated_size,
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    if (vd_register_driver(&mem_drv) < 0) {
        abort();
    }
    return 0;
}

static uint32_t be32_at(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Does the header ask for an L1 or refcount table of (up to the limits) megabytes past the end? */
static bool huge_table(const uint8_t *data, size_t size)
{
    if (size < 72) {
        return false;
    }
    uint32_t cluster_bits = be32_at(data + 20);
    uint64_t l1_bytes = (uint64_t)be32_at(data + 36) * 8;
    uint64_t rt_bytes = cluster_bits < 32 ? (uint64_t)be32_at(data + 56) << cluster_bits : 0;
    uint64_t limit = (uint64_t)size + TABLE_SLACK;
    return (l1_bytes > limit && l1_bytes <= QCOW2_MAX_L1_SIZE) ||
           (rt_bytes > limit && rt_bytes <= QCOW2_MAX_REFTABLE_SIZE);
}

static void read_some(BlockNode *bs)
{
    int64_t len = vd_getlength(bs);
    if (len <= 0) {
        return;
    }
    static uint8_t buf[65536];
    uint64_t end = (uint64_t)len < MAX_READ ? (uint64_t)len : MAX_READ;
    for (uint64_t off = 0; off < end; off += sizeof(buf)) {
        uint64_t n = end - off < sizeof(buf) ? end - off : sizeof(buf);
        uint64_t pnum = 0;
        VdBlockStatus st;
        vd_block_status(bs, off, n, &pnum, &st);
        if (vd_pread(bs, off, n, buf) < 0) {
            break;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (huge_table(data, size)) {
        return -1; /* not added to the corpus */
    }
    cur_data = data;
    cur_size = size;
    VdError *err = NULL;
    BlockNode *bs = vd_open_image("fuzzmem://input", "qcow2", VD_OPEN_NO_BACKING, &err);
    if (bs) {
        read_some(bs);
        VdCheckResult res = {0};
        vd_check(bs, &res, VD_CHECK_QUIET, &err);
        vd_check_result_clear(&res);
        vd_node_unref(bs);
    }
    vd_error_free(err);
    return 0;
}
