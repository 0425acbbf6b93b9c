/*
 * qcow2-create.c - `create` for qcow2 (vd_drv_qcow2.create): validates the create options as
 * qemu-img does, lays out header, refcount table/blocks and L1 as qemu-img's layout, then
 * preallocates through a normal read-write open when asked.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2.h"
#include "util/lock.h"
#include "util/secret.h"

static int luks_hdr_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    Qcow2State *s = opaque;
    if (offset > s->crypto_len || len > s->crypto_len - offset) {
        return -EINVAL;
    }
    return vd_pwrite(s->bs->file, s->crypto_off + offset, len, buf, 0);
}

/* Before anything is written: what add_luks will need is there. */
static int check_encrypt_opts(const VdCreateOptions *o, VdError **errp)
{
    if (strcmp(o->encrypt_format, "luks") != 0) {
        vd_error_setg(errp, ENOTSUP, "Legacy AES-CBC qcow2 encryption is not supported: use "
                      "encrypt.format=luks");
        return -ENOTSUP;
    }
    if (o->prealloc != VD_PREALLOC_OFF) {
        vd_error_setg(errp, ENOTSUP, "Preallocation of encrypted images is not supported by "
                      "vdisk");
        return -ENOTSUP;
    }
    if (vd_luks_check_options(&o->luks, errp) < 0) {
        return -EINVAL;
    }
    if (!o->key_secret) {
        vd_error_setg(errp, EINVAL, "Parameter 'encrypt.key-secret' is required for cipher");
        return -EINVAL;
    }
    char *pw;
    size_t len;
    int ret = vd_secret_lookup_utf8(o->key_secret, &pw, &len, errp);
    if (ret == 0) {
        vd_secret_free(pw, len);
    }
    return ret;
}

/*
 * encrypt.format=luks on a freshly created image: a LUKS header (QEMU's defaults for what the
 * options leave out) in newly allocated clusters, named by the crypto header extension, and
 * crypt_method 2 in the header, written last.
 */
static int add_luks(const char *filename, const VdCreateOptions *o, VdError **errp)
{
    VdLuks *l = NULL;
    int ret = vd_crypt_create(&l, &o->luks, o->key_secret, "encrypt.key-secret", errp);
    if (ret < 0) {
        return ret;
    }
    BlockNode *bs = vd_open_image(filename, "qcow2", VD_OPEN_RDWR | VD_OPEN_NO_BACKING, errp);
    if (!bs) {
        vd_luks_free(l);
        return -EIO;
    }
    Qcow2State *s = q2_state(bs);
    uint64_t len = vd_luks_header_len(l);
    uint64_t n = (len + s->cluster_size - 1) / s->cluster_size;
    uint8_t ext[16];
    vd_mutex_lock(&s->lock);
    ret = q2_alloc_clusters(s, n, &s->crypto_off);
    if (ret == 0) {
        s->crypto_len = len;
        ret = vd_pwrite_zeroes(s->bs->file, s->crypto_off, n * s->cluster_size, 0);
    }
    if (ret == 0) {
        ret = vd_luks_write_header(l, luks_hdr_write, s, errp);
    }
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    if (ret == 0) {
        qcow2_put_be64(ext, s->crypto_off);
        qcow2_put_be64(ext + 8, len);
        s->h.crypt_method = QCOW2_CRYPT_LUKS;
        ret = q2_update_header_ext(s, QCOW2_EXT_CRYPTO, ext, sizeof(ext),
                                   s->h.autoclear_features);
    }
    vd_mutex_unlock(&s->lock);
    s->crypto_off = s->crypto_len = 0;
    vd_node_unref(bs);
    vd_luks_free(l);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not write the encryption header of '%s'",
                            filename);
    }
    return ret;
}

/*
 * The external data file, created empty with the image's size (an existing file is emptied,
 * as qemu-img create does). A relative name is relative to the image's directory, as vdisk
 * opens it (QEMU 7.2: the working directory).
 */
static int create_data_file(const char *filename, const char *data_file, uint64_t size,
                            const VdFileCreateOptions *file_opts, VdError **errp)
{
    if (strlen(data_file) > 1023) {
        vd_error_setg(errp, EINVAL, "data-file name too long");
        return -EINVAL;
    }
    char *path = vd_filename_is_uri(data_file) ? strdup(data_file)
                                               : vd_resolve_backing_path(filename, data_file);
    if (!path) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    VdCreateOptions fo;
    memset(&fo, 0, sizeof(fo));
    fo.format = "file";
    fo.size = size;
    fo.size_given = true;
    fo.file = *file_opts; /* qemu-img creates it with the image's protocol options */
    int ret = vd_protocol_create(path, &fo, errp);
    free(path);
    return ret;
}

static int parse_create_opts(const VdCreateOptions *o, uint32_t *cbits, uint32_t *version,
                             uint32_t *rorder, uint8_t *ctype, VdError **errp)
{
    uint64_t cs = o->cluster_size ? o->cluster_size : 65536;
    if (cs < 512 || cs > (2ULL << 20) || (cs & (cs - 1))) {
        vd_error_setg(errp, EINVAL, "Cluster size must be a power of two between 512 and "
                      "2048k");
        return -EINVAL;
    }
    *cbits = (uint32_t)__builtin_ctzll(cs);
    if (!o->compat || !strcmp(o->compat, "1.1") || !strcmp(o->compat, "v3")) {
        *version = 3;
    } else if (!strcmp(o->compat, "0.10") || !strcmp(o->compat, "v2")) {
        *version = 2;
    } else {
        vd_error_setg(errp, EINVAL, "Invalid parameter '%s'", o->compat);
        return -EINVAL;
    }
    int rb = o->refcount_bits ? o->refcount_bits : 16;
    if (rb < 1 || rb > 64 || (rb & (rb - 1))) {
        vd_error_setg(errp, EINVAL, "Refcount width must be a power of two and may not exceed "
                      "64 bits");
        return -EINVAL;
    }
    *rorder = (uint32_t)__builtin_ctz((unsigned)rb);
    if (*version == 2 && rb != 16) {
        vd_error_setg(errp, EINVAL, "Different refcount widths than 16 bits require "
                      "compatibility level 1.1 or above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (*version == 2 && o->lazy_refcounts) {
        vd_error_setg(errp, EINVAL, "Lazy refcounts only supported with compatibility level 1.1 "
                      "and above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (o->extended_l2) {
        if (*version == 2) {
            vd_error_setg(errp, EINVAL, "Extended L2 entries are only supported with "
                          "compatibility level 1.1 and above (use version=v3 or greater)");
            return -EINVAL;
        }
        if (cs < 16384) {
            vd_error_setg(errp, EINVAL, "Extended L2 entries are only supported with cluster "
                          "sizes of at least 16384 bytes");
            return -EINVAL;
        }
    }
    if (o->data_file_raw && !o->data_file) {
        vd_error_setg(errp, EINVAL, "data-file-raw requires data-file");
        return -EINVAL;
    }
    if (o->data_file && *version == 2) {
        vd_error_setg(errp, EINVAL, "External data files are only supported with compatibility "
                      "level 1.1 and above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (o->data_file_raw && o->backing_file) {
        vd_error_setg(errp, EINVAL, "Backing file and data-file-raw cannot be used at the same "
                      "time");
        return -EINVAL;
    }
    *ctype = QCOW2_COMPRESSION_ZLIB;
    if (o->compression_type && strcmp(o->compression_type, "zlib")) {
        if (strcmp(o->compression_type, "zstd")) {
            vd_error_setg(errp, EINVAL, "Invalid compression type '%s'", o->compression_type);
            return -EINVAL;
        }
        if (*version == 2) {
            vd_error_setg(errp, EINVAL, "Non-zlib compression type is only supported with "
                          "compatibility level 1.1 and above (use version=v3 or greater)");
            return -EINVAL;
        }
        *ctype = QCOW2_COMPRESSION_ZSTD;
    }
    return 0;
}

int q2_create(const char *filename, const VdCreateOptions *o, VdError **errp)
{
    uint32_t cbits, version, rorder;
    uint8_t ctype;
    int ret = parse_create_opts(o, &cbits, &version, &rorder, &ctype, errp);
    if (ret < 0 || (o->encrypt_format && (ret = check_encrypt_opts(o, errp)) < 0)) {
        return ret;
    }
    uint64_t cs = 1ULL << cbits;
    uint64_t size = o->size;
    if (!o->size_given && size == 0 && o->backing_file) {
        char *path = vd_resolve_backing_path(filename, o->backing_file);
        if (!path) {
            vd_error_setg(errp, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        BlockNode *b = vd_open_image(path, o->backing_fmt, VD_OPEN_NO_BACKING, errp);
        free(path);
        if (!b) {
            vd_error_prepend(errp, "Could not open backing image: ");
            return -EINVAL;
        }
        int64_t l = vd_getlength(b);
        vd_node_unref(b);
        if (l < 0) {
            vd_error_setg_errno(errp, (int)-l, "Could not get the size of the backing image");
            return (int)l;
        }
        size = (uint64_t)l;
    }
    if (o->backing_file && o->prealloc != VD_PREALLOC_OFF && !o->extended_l2) {
        vd_error_setg(errp, EINVAL, "Backing file and preallocation can only be used at the "
                      "same time if extended_l2 is on");
        return -EINVAL;
    }
    uint32_t l2_bits = cbits - (o->extended_l2 ? 4 : 3);
    uint64_t per_l1 = cs << l2_bits;
    size = size > (1ULL << 62) ? size : (size + 511) & ~511ULL; /* qemu-img: whole sectors */
    uint64_t l1_size = (size + per_l1 - 1) / per_l1;
    if (size > (1ULL << 62) || l1_size * 8 > QCOW2_MAX_L1_SIZE) {
        /* qemu-img's words (its L1 table would exceed QCOW_MAX_L1_SIZE) */
        vd_error_setg(errp, EFBIG, "The image size is too large for file format 'qcow2' (try "
                      "using a larger cluster size)");
        return -EFBIG;
    }
    if (o->backing_file && strlen(o->backing_file) > Q2_MAX_BACKING_NAME) {
        vd_error_setg(errp, EINVAL, "Backing file name too long");
        return -EINVAL;
    }

    /* layout: header, refcount table, refcount block(s), L1 table (as qemu-img) */
    uint64_t rbe = 1ULL << (cbits + 3 - rorder);
    uint64_t l1_cl = (l1_size * 8 + cs - 1) / cs;
    uint64_t rt_cl = 1, rb_cl = 1;
    for (int i = 0; i < 64; i++) {
        uint64_t total = 1 + rt_cl + rb_cl + l1_cl;
        uint64_t nrb = (total + rbe - 1) / rbe;
        uint64_t nrt = (nrb * 8 + cs - 1) / cs;
        if (nrb == rb_cl && nrt == rt_cl) {
            break;
        }
        rb_cl = nrb;
        rt_cl = nrt;
    }
    uint64_t total = 1 + rt_cl + rb_cl + l1_cl;

    VdCreateOptions fo;
    memset(&fo, 0, sizeof(fo));
    fo.format = "file";
    fo.prealloc = VD_PREALLOC_OFF;
    fo.file = o->file;
    if (o->data_file &&
        (ret = create_data_file(filename, o->data_file, size, &o->file, errp)) < 0) {
        return ret;
    }
    ret = vd_protocol_create(filename, &fo, errp); /* file or nbd, as the name says */
    if (ret < 0) {
        return ret;
    }
    BlockNode *file = vd_open_protocol(filename, VD_OPEN_RDWR, errp);
    if (!file) {
        return -EIO;
    }

    Qcow2State *s = calloc(1, sizeof(*s));
    uint8_t *meta = calloc(total - 1 ? total - 1 : 1, cs);
    uint8_t *hdr = calloc(1, cs);
    if (!s || !meta || !hdr) {
        ret = -ENOMEM;
        goto out;
    }
    BlockNode fake;
    memset(&fake, 0, sizeof(fake));
    fake.file = file;
    s->bs = &fake;
    s->cluster_bits = cbits;
    s->cluster_size = cs;
    s->h.version = version;
    s->h.cluster_bits = cbits;
    s->h.size = size;
    s->l1_size = (uint32_t)l1_size;
    s->l1_offset = (1 + rt_cl + rb_cl) * cs;
    s->reftable_offset = cs;
    s->h.refcount_table_clusters = (uint32_t)rt_cl;
    s->h.refcount_order = rorder;
    s->h.header_length = Q2_V3_HEADER_LEN_CT;
    s->compression_type = ctype;
    s->refcount_order = rorder;
    if (ctype != QCOW2_COMPRESSION_ZLIB) {
        s->h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION;
    }
    if (o->extended_l2) {
        s->h.incompatible_features |= QCOW2_INCOMPAT_EXTL2;
    }
    if (o->lazy_refcounts) {
        s->h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    }
    if (o->data_file) {
        s->h.incompatible_features |= QCOW2_INCOMPAT_DATA_FILE;
        if (o->data_file_raw) {
            s->h.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW;
        }
        /* after the backing format, before the feature table, as QEMU orders them */
        if (q2_add_ext(s, QCOW2_EXT_DATA_FILE, (const uint8_t *)o->data_file,
                       (uint32_t)strlen(o->data_file)) < 0) {
            ret = -ENOMEM;
            goto out;
        }
    }
    if (o->backing_file && *o->backing_file) {
        s->backing_file = strdup(o->backing_file);
        if (o->backing_fmt && *o->backing_fmt) {
            s->backing_fmt = strdup(o->backing_fmt);
        }
    }
    if (version >= 3 && q2_add_feature_table(s) < 0) {
        ret = -ENOMEM;
        goto out;
    }
    ret = q2_build_header(s, hdr);
    if (ret < 0) {
        vd_error_setg(errp, EINVAL, "Backing file name does not fit in the header cluster");
        goto out;
    }
    /* refcount table (cluster 1..), refcount blocks, then the (zero) L1 table */
    uint8_t *rt = meta;
    uint8_t *rbs = meta + rt_cl * cs;
    for (uint64_t i = 0; i < rb_cl; i++) {
        qcow2_put_be64(rt + 8 * i, (1 + rt_cl + i) * cs);
    }
    uint64_t referenced = 1 + rt_cl + rb_cl + (l1_size ? l1_cl : 0);
    s->rb_bits = cbits + 3 - rorder;
    for (uint64_t c = 0; c < referenced; c++) {
        q2_refblock_set(s, rbs + (c / rbe) * cs, c % rbe, 1);
    }
    ret = vd_pwrite(file, cs, (rt_cl + rb_cl) * cs, meta, 0);
    if (ret == 0 && l1_size) {
        ret = vd_pwrite(file, s->l1_offset, l1_size * 8, meta + (rt_cl + rb_cl) * cs, 0);
    }
    if (ret == 0) {
        ret = vd_flush(file);
    }
    if (ret == 0) {
        ret = vd_pwrite(file, 0, cs, hdr, 0);
    }
    if (ret == 0) {
        ret = vd_flush(file);
    }
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not write the qcow2 image '%s'", filename);
    }
out:
    if (s) {
        free(s->backing_file);
        free(s->backing_fmt);
        q2_free_exts(s);
    }
    free(s);
    free(meta);
    free(hdr);
    vd_node_unref(file);
    if (ret == -ENOMEM) {
        vd_error_setg(errp, ENOMEM, "out of memory");
    }
    if (ret == 0 && o->encrypt_format) {
        ret = add_luks(filename, o, errp);
    }
    /* a raw data file must read as the image does: map it 1:1 (QEMU's metadata preallocation) */
    VdPrealloc prealloc = o->data_file_raw && o->prealloc == VD_PREALLOC_OFF
                              ? VD_PREALLOC_METADATA : o->prealloc;
    if (ret < 0 || prealloc == VD_PREALLOC_OFF || size == 0) {
        return ret;
    }
    BlockNode *bs = vd_open_image(filename, "qcow2", VD_OPEN_RDWR | VD_OPEN_NO_BACKING, errp);
    if (!bs) {
        return -EIO;
    }
    Qcow2State *qs = q2_state(bs);
    vd_mutex_lock(&qs->lock);
    ret = q2_preallocate_locked(qs, 0, size, prealloc);
    vd_mutex_unlock(&qs->lock);
    vd_node_unref(bs);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not preallocate '%s'", filename);
    }
    return ret;
}
