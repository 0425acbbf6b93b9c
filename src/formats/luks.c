/*
 * luks.c - the "luks" format (QEMU's driver=luks): a LUKS1 header and key slots at the start of
 * the file, the guest's bytes encrypted after them (payload offset from the header; sector IVs
 * count from the payload start). Opened with the password in the secret object key-secret, or
 * header only for qemu-img info (VD_OPEN_NO_IO). Data I/O and its locking: formats/crypt-io.h;
 * the header is never rewritten after creation.
 */
#include <errno.h>
#include <jansson.h>
#include <string.h>

#include "block/block.h"
#include "formats/crypt-io.h"

typedef struct LuksState {
    VdCryptIO crypt;
    uint64_t payload; /* bytes */
} LuksState;

static int file_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    return vd_pread(opaque, offset, len, buf);
}

static int file_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    return vd_pwrite(opaque, offset, len, buf, 0);
}

/* QEMU's block_crypto_probe_luks: the magic and version 1. */
static int luks_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return len >= 8 && !memcmp(buf, "LUKS\xba\xbe\x00\x01", 8) ? 100 : 0;
}

static int luks_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    LuksState *s = bs->opaque;
    int r = vd_crypt_open(&s->crypt, file_read, bs->file, opts->key_secret,
                          (opts->flags & VD_OPEN_NO_IO) != 0, "key-secret", errp);
    if (r < 0) {
        return r;
    }
    s->payload = vd_luks_header_len(s->crypt.luks);
    bs->encrypted = true;
    return 0;
}

static void luks_close(BlockNode *bs)
{
    vd_crypt_close(&((LuksState *)bs->opaque)->crypt);
}

static int64_t luks_getlength(BlockNode *bs)
{
    LuksState *s = bs->opaque;
    int64_t len = vd_getlength(bs->file);
    if (len < 0) {
        return len;
    }
    return (uint64_t)len < s->payload ? 0 : len - (int64_t)s->payload;
}

static int luks_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    LuksState *s = bs->opaque;
    return vd_crypt_pread(&s->crypt, bs->file, s->payload + offset, offset, bytes, buf);
}

static int luks_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                       int flags)
{
    LuksState *s = bs->opaque;
    return vd_crypt_pwrite(&s->crypt, bs->file, s->payload + offset, offset, bytes, buf, flags);
}

static int luks_flush(BlockNode *bs)
{
    return 0; /* vd_flush flushes the file child after this */
}

static int luks_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                         VdError **errp)
{
    LuksState *s = bs->opaque;
    if (size > (uint64_t)INT64_MAX - s->payload) {
        vd_error_setg(errp, EFBIG, "The image size is too large");
        return -EFBIG;
    }
    return vd_truncate(bs->file, s->payload + size, shrink, prealloc, errp);
}

static int64_t luks_allocated_size(BlockNode *bs)
{
    return bs->file->drv->allocated_size ? bs->file->drv->allocated_size(bs->file) : -ENOTSUP;
}

/* The header has no dirty flag: the file's answer is the image's (QEMU's block-crypto). */
static int luks_is_dirty(BlockNode *bs, bool *dirty)
{
    return vd_is_dirty(bs->file, dirty);
}

static json_t *luks_specific_info(BlockNode *bs)
{
    LuksState *s = bs->opaque;
    json_t *o = json_object();
    json_object_set_new(o, "type", json_string("luks"));
    json_object_set_new(o, "data", vd_luks_info(s->crypt.luks));
    return o;
}

static int luks_create(const char *filename, const VdCreateOptions *o, VdError **errp)
{
    if (o->backing_file) {
        vd_error_setg(errp, ENOTSUP, "Format 'luks' does not support backing files");
        return -ENOTSUP;
    }
    VdLuks *l = NULL;
    int r = vd_crypt_create(&l, &o->luks, o->key_secret, "key-secret", errp);
    if (r < 0) {
        return r;
    }
    uint64_t hlen = vd_luks_header_len(l);
    uint64_t size = (o->size + 511) / 512 * 512;
    VdCreateOptions fo = {.format = "file", .prealloc = VD_PREALLOC_OFF, .file = o->file};
    BlockNode *file = NULL;
    if (size > (uint64_t)INT64_MAX - hlen) {
        vd_error_setg(errp, EFBIG, "The image size is too large for file format 'luks'");
        r = -EFBIG;
    } else if ((r = vd_protocol_create(filename, &fo, errp)) == 0 &&
               !(file = vd_open_protocol(filename, VD_OPEN_RDWR, errp))) {
        r = -EIO;
    }
    if (r == 0) {
        r = vd_luks_write_header(l, file_write, file, errp);
    }
    if (r == 0) {
        r = vd_truncate(file, hlen + size, false, o->prealloc, errp);
    }
    if (r == 0 && (r = vd_flush(file)) < 0) {
        vd_error_setg_errno(errp, -r, "Could not flush '%s'", filename);
    }
    if (file) {
        vd_node_unref(file);
    }
    vd_luks_free(l);
    return r;
}

/* qemu-img measure -O luks: the header, then every (sector-rounded) byte, allocated or not. */
static int luks_measure(const VdCreateOptions *o, BlockNode *src, uint64_t *required,
                        uint64_t *fully_allocated, VdError **errp)
{
    uint64_t size = o->size;
    if (src) {
        int64_t len = vd_getlength(src);
        if (len < 0) {
            vd_error_setg_errno(errp, (int)-len, "Unable to get image virtual_size");
            return (int)len;
        }
        size = (uint64_t)len;
    }
    uint64_t hlen;
    int r = vd_crypt_header_size(&o->luks, o->key_secret, "key-secret", &hlen, errp);
    if (r < 0) {
        return r;
    }
    size = (size + 511) / 512 * 512;
    *required = *fully_allocated = hlen + size;
    return 0;
}

/* BlockdevOptionsLUKS. */
static const VdOptSpec luks_blockdev_options[] = {
    {"file", VD_OPT_REF, true},
    {"key-secret", VD_OPT_STR},
    {"header", VD_OPT_REF, .unsupported = " (a detached LUKS header)"},
    {NULL}};

const BlockDriver vd_drv_luks = {
    .name = "luks",
    .blockdev_options = luks_blockdev_options,
    .state_size = sizeof(LuksState),
    .probe = luks_probe,
    .open = luks_open,
    .close = luks_close,
    .create = luks_create,
    .measure = luks_measure,
    .pread = luks_pread,
    .pwrite = luks_pwrite,
    .flush = luks_flush,
    .getlength = luks_getlength,
    .allocated_size = luks_allocated_size,
    .truncate = luks_truncate,
    .get_specific_info = luks_specific_info,
    .is_dirty = luks_is_dirty,
};
