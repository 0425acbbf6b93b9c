/*
 * null.c - QEMU's null-co protocol: a device of `size` bytes (default 1 GiB; rounded up to whole
 * sectors, as QEMU counts lengths) that discards writes and, with read-zeroes=on, reads zeroes
 * (else reads leave the buffer as it was, as QEMU's). For benchmarks and tests; opened as "null-co://" or through json:/--image-opts /
 * blockdev-add with its options. No state beyond the two options; any thread may call anything.
 */
#include <errno.h>
#include <string.h>

#include <jansson.h>

#include "block/block.h"

typedef struct NullState {
    uint64_t size;
    bool read_zeroes;
} NullState;

#define NULL_DEFAULT_SIZE (1ULL << 30)

static int null_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    NullState *s = bs->opaque;
    s->size = NULL_DEFAULT_SIZE;
    s->read_zeroes = false;
    if (opts && opts->options) {
        int ret = vd_options_u64(opts->options, "size", &s->size, errp);
        if (ret == 0) {
            ret = vd_options_bool(opts->options, "read-zeroes", &s->read_zeroes, errp);
        }
        if (ret < 0) {
            return ret;
        }
        if (s->size > INT64_MAX) {
            vd_error_setg(errp, EINVAL, "Parameter 'size' expects a non-negative number below 2^63");
            return -EINVAL;
        }
    }
    /* QEMU counts a node's length in whole 512-byte sectors: size=1000 is a 1024-byte device */
    if (s->size <= (uint64_t)INT64_MAX - 511) {
        s->size = (s->size + 511) / 512 * 512;
    }
    return 0;
}

static void null_close(BlockNode *bs)
{
}

static int null_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    NullState *s = bs->opaque;
    if (s->read_zeroes) {
        memset(buf, 0, bytes);
    }
    return 0;
}

static int null_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    return 0;
}

static int null_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    return 0;
}

static int null_flush(BlockNode *bs)
{
    return 0;
}

/* As QEMU: with read-zeroes everything is zero at "host offset" = offset; else nothing known. */
static int null_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                             uint64_t *map, BlockNode **file)
{
    NullState *s = bs->opaque;
    *pnum = bytes;
    if (!s->read_zeroes) {
        return 0;
    }
    *map = offset;
    *file = bs;
    return VD_BS_ZERO | VD_BS_OFFSET_VALID;
}

static int64_t null_getlength(BlockNode *bs)
{
    return (int64_t)((NullState *)bs->opaque)->size;
}

static int64_t null_allocated_size(BlockNode *bs)
{
    return 0;
}

static const char *const null_schemes[] = {"null-co", NULL};
/* QEMU names the node "null-co://" unless one of these is given (latency-ns does not count) */
static const char *const null_json_name_options[] = {"size", "read-zeroes", NULL};

static const VdOptSpec null_blockdev_options[] = {
    {"size", VD_OPT_INT},
    {"latency-ns", VD_OPT_INT},
    {"read-zeroes", VD_OPT_BOOL},
    {NULL}};

const BlockDriver vd_drv_null_co = {
    .name = "null-co",
    .is_protocol = true,
    .uri_schemes = null_schemes,
    .blockdev_options = null_blockdev_options,
    .json_name_options = null_json_name_options,
    .state_size = sizeof(NullState),
    .open = null_open,
    .close = null_close,
    .pread = null_pread,
    .pwrite = null_pwrite,
    .pwrite_zeroes = null_pwrite_zeroes,
    .flush = null_flush,
    .block_status = null_block_status,
    .getlength = null_getlength,
    .allocated_size = null_allocated_size,
};
