/*
 * qcow2-header.c - the qcow2 header cluster: parsing and validating the fixed header, its
 * extensions and backing names at open (q2_parse_header), and writing it back whole
 * (q2_build_header / q2_update_header_ext). Unknown header fields and extensions are preserved.
 * The fixed fields are decoded and validated as the checker does it, by the same code
 * (qcow2_header_decode, qcow2_header_validate in qcow2-format.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2.h"

static const struct {
    uint8_t type, bit;
    const char *name;
} q2_features[] = {
    { 0, 0, "dirty bit" },
    { 0, 1, "corrupt bit" },
    { 0, 2, "external data file" },
    { 0, 3, "compression type" },
    { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" },
    { 2, 0, "bitmaps" },
    { 2, 1, "raw external data" },
};

int q2_write_header_field(Qcow2State *s, uint64_t off, const void *data, uint32_t len)
{
    return vd_pwrite(s->bs->file, off, len, data, 0);
}

void q2_free_exts(Qcow2State *s)
{
    for (int i = 0; i < s->nb_exts; i++) {
        free(s->exts[i].data);
    }
    free(s->exts);
    s->exts = NULL;
    s->nb_exts = 0;
}

int q2_add_ext(Qcow2State *s, uint32_t type, const uint8_t *data, uint32_t len)
{
    Qcow2Ext *n = realloc(s->exts, sizeof(Qcow2Ext) * (size_t)(s->nb_exts + 1));
    if (!n) {
        return -ENOMEM;
    }
    s->exts = n;
    uint8_t *d = malloc(len ? len : 1);
    if (!d) {
        return -ENOMEM;
    }
    memcpy(d, data, len);
    s->exts[s->nb_exts].type = type;
    s->exts[s->nb_exts].len = len;
    s->exts[s->nb_exts].data = d;
    s->nb_exts++;
    return 0;
}

int q2_update_header_ext(Qcow2State *s, uint32_t type, const uint8_t *data, uint32_t len,
                         uint64_t autoclear)
{
    int i = 0;
    while (i < s->nb_exts && s->exts[i].type != type) {
        i++;
    }
    int ret = 0;
    if (i < s->nb_exts && data) {
        /* replaced where it stands: QEMU keeps its extensions in one order too */
        uint8_t *d = malloc(len ? len : 1);
        if (!d) {
            return -ENOMEM;
        }
        memcpy(d, data, len);
        free(s->exts[i].data);
        s->exts[i].data = d;
        s->exts[i].len = len;
    } else if (i < s->nb_exts) {
        free(s->exts[i].data);
        memmove(&s->exts[i], &s->exts[i + 1], sizeof(Qcow2Ext) * (size_t)(s->nb_exts - i - 1));
        s->nb_exts--;
    } else if (data) {
        ret = q2_add_ext(s, type, data, len);
    }
    uint8_t *buf = malloc(s->cluster_size);
    if (ret < 0 || !buf) {
        free(buf);
        return -ENOMEM;
    }
    s->h.autoclear_features = autoclear;
    ret = q2_build_header(s, buf);
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, 0, s->cluster_size, buf, 0);
    }
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    free(buf);
    return ret;
}

int q2_add_feature_table(Qcow2State *s)
{
    size_t n = sizeof(q2_features) / sizeof(q2_features[0]);
    uint8_t *t = calloc(n, 48);
    if (!t) {
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        t[i * 48] = q2_features[i].type;
        t[i * 48 + 1] = q2_features[i].bit;
        strncpy((char *)t + i * 48 + 2, q2_features[i].name, 46);
    }
    int ret = q2_add_ext(s, QCOW2_EXT_FEATURE_TABLE, t, (uint32_t)(n * 48));
    free(t);
    return ret;
}

/*
 * Build the whole header cluster from s (fixed header, backing format, preserved extensions,
 * end marker, backing file name). -ENOSPC if it does not fit in the first cluster.
 */
int q2_build_header(Qcow2State *s, uint8_t *buf)
{
    uint64_t cs = s->cluster_size;
    uint32_t hlen = s->h.version >= 3 ? s->h.header_length : QCOW2_V2_HEADER_SIZE;
    memset(buf, 0, cs);
    if (s->hdr_raw && s->h.version >= 3 && s->hdr_raw_len == hlen) {
        memcpy(buf, s->hdr_raw, hlen); /* keeps fields we do not know */
    }
    qcow2_put_be32(buf + 0, QCOW2_MAGIC);
    qcow2_put_be32(buf + 4, s->h.version);
    qcow2_put_be32(buf + 20, s->h.cluster_bits);
    qcow2_put_be64(buf + 24, s->h.size);
    qcow2_put_be32(buf + 32, s->h.crypt_method);
    qcow2_put_be32(buf + 36, s->l1_size);
    qcow2_put_be64(buf + 40, s->l1_offset);
    qcow2_put_be64(buf + 48, s->reftable_offset);
    qcow2_put_be32(buf + 56, s->h.refcount_table_clusters);
    qcow2_put_be32(buf + 60, s->h.nb_snapshots);
    qcow2_put_be64(buf + 64, s->h.snapshots_offset);
    if (s->h.version >= 3) {
        qcow2_put_be64(buf + 72, s->h.incompatible_features);
        qcow2_put_be64(buf + 80, s->h.compatible_features);
        qcow2_put_be64(buf + 88, s->h.autoclear_features);
        qcow2_put_be32(buf + 96, s->h.refcount_order);
        qcow2_put_be32(buf + 100, hlen);
        if (hlen > 104) {
            buf[104] = s->compression_type;
        }
    }
    uint64_t off = hlen;
    if (s->backing_fmt) {
        uint32_t l = (uint32_t)strlen(s->backing_fmt);
        uint64_t need = 8 + ((l + 7ULL) & ~7ULL);
        if (off + need + 8 > cs) {
            return -ENOSPC;
        }
        qcow2_put_be32(buf + off, QCOW2_EXT_BACKING_FORMAT);
        qcow2_put_be32(buf + off + 4, l);
        memcpy(buf + off + 8, s->backing_fmt, l);
        off += need;
    }
    for (int i = 0; i < s->nb_exts; i++) {
        uint64_t need = 8 + ((s->exts[i].len + 7ULL) & ~7ULL);
        if (off + need + 8 > cs) {
            return -ENOSPC;
        }
        qcow2_put_be32(buf + off, s->exts[i].type);
        qcow2_put_be32(buf + off + 4, s->exts[i].len);
        memcpy(buf + off + 8, s->exts[i].data, s->exts[i].len);
        off += need;
    }
    off += 8; /* end of extensions */
    if (s->backing_file) {
        uint64_t l = strlen(s->backing_file);
        if (l > Q2_MAX_BACKING_NAME || off + l > cs) {
            return -ENOSPC;
        }
        memcpy(buf + off, s->backing_file, l);
        qcow2_put_be64(buf + 8, off);
        qcow2_put_be32(buf + 16, (uint32_t)l);
    } else {
        qcow2_put_be64(buf + 8, 0);
        qcow2_put_be32(buf + 16, 0);
    }
    return 0;
}

/* Parse and validate the header; fills s->h, geometry, extensions and backing names. */
int q2_parse_header(BlockNode *bs, Qcow2State *s, int flags, VdError **errp)
{
    int64_t flen = vd_getlength(bs->file);
    if (flen < 0) {
        vd_error_setg_errno(errp, (int)-flen, "qcow2: could not get the size of '%s'",
                            bs->filename);
        return (int)flen;
    }
    /* Past EOF the header reads as zeroes, as QEMU reads it (so a cut-short header fails on
       the field it lacks, with QEMU's words). */
    uint8_t fix[QCOW2_HEADER_DECODE_SIZE];
    memset(fix, 0, sizeof(fix));
    uint64_t rd = (uint64_t)flen < sizeof(fix) ? (uint64_t)flen : sizeof(fix);
    int ret = vd_pread(bs->file, 0, rd, fix);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the header");
        return ret;
    }
    Qcow2Header *h = &s->h;
    qcow2_header_decode(fix, h);
    bool cs_valid = h->cluster_bits >= QCOW2_MIN_CLUSTER_BITS &&
                    h->cluster_bits <= QCOW2_MAX_CLUSTER_BITS;
    uint64_t cs = cs_valid ? 1ULL << h->cluster_bits : 0;

    /* the header cluster: extensions and backing name must lie inside it */
    uint64_t hc = (uint64_t)flen < cs ? (uint64_t)flen : cs;
    uint8_t *hbuf = cs ? calloc(1, cs) : NULL;
    if (cs && !hbuf) {
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    ret = hbuf ? vd_pread(bs->file, 0, hc, hbuf) : 0;
    if (ret < 0) {
        free(hbuf);
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the header");
        return ret;
    }
    bool rw = flags & VD_OPEN_RDWR;
    ret = qcow2_header_validate(h, hbuf, cs, (rw ? QCOW2_VALIDATE_RDWR : 0) |
                                (flags & VD_OPEN_CHECK ? QCOW2_VALIDATE_REPAIR : 0), errp);
    if (ret < 0) {
        free(hbuf);
        return ret;
    }
    /*
     * QEMU counts the disk in whole sectors, rounded down (total_sectors = size / 512): a
     * crafted size of 1000 is a 512-byte disk, and a header it rewrites says 512. Validation
     * above saw the size as stored, as QEMU's checks do.
     */
    h->size &= ~511ULL;
    free(s->hdr_raw);
    s->hdr_raw_len = h->header_length;
    s->hdr_raw = malloc(h->header_length);
    if (!s->hdr_raw) {
        free(hbuf);
        return -ENOMEM;
    }
    memcpy(s->hdr_raw, hbuf, h->header_length);

    q2_free_exts(s);
    free(s->backing_fmt);
    s->backing_fmt = NULL;
    free(s->backing_file);
    s->backing_file = NULL;
    uint64_t off = h->header_length;
    uint64_t ext_end = h->backing_file_offset && h->backing_file_offset < cs
                           ? h->backing_file_offset : cs;
    ret = 0;
    Qcow2ExtView e;
    while (qcow2_ext_next(hbuf, ext_end, &off, &e)) {
        if (e.type == QCOW2_EXT_END) {
            break;
        }
        if (!e.fits) {
            vd_error_setg(errp, EINVAL, "qcow2: header extension 0x%08" PRIx32
                          " extends past the header cluster", e.type);
            ret = -EINVAL;
            break;
        }
        if (e.type == QCOW2_EXT_BACKING_FORMAT) {
            if (e.len > 1023) {
                vd_error_setg(errp, EINVAL, "qcow2: backing format name too long");
                ret = -EINVAL;
                break;
            }
            s->backing_fmt = strndup((const char *)e.data, e.len);
            if (!s->backing_fmt) {
                ret = -ENOMEM;
                break;
            }
        } else {
            ret = q2_add_ext(s, e.type, e.data, e.len);
            if (ret < 0) {
                break;
            }
        }
    }
    if (ret == 0 && h->backing_file_offset) {
        if (h->backing_file_size > Q2_MAX_BACKING_NAME ||
            h->backing_file_offset > cs - h->backing_file_size ||
            h->backing_file_offset + h->backing_file_size > hc) {
            vd_error_setg(errp, EINVAL, "qcow2: backing file name is invalid or too long");
            ret = -EINVAL;
        } else if (h->backing_file_size) {
            s->backing_file = strndup((const char *)hbuf + h->backing_file_offset,
                                      h->backing_file_size);
            if (!s->backing_file) {
                ret = -ENOMEM;
            }
        }
    }
    free(hbuf);
    if (ret < 0) {
        if (ret == -ENOMEM) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        }
        return ret;
    }

    /* features */
    if (h->crypt_method == QCOW2_CRYPT_AES) {
        vd_error_setg(errp, ENOTSUP, "qcow2: legacy AES-CBC encryption is not supported "
                      "(convert such images with qemu-img)");
        return -ENOTSUP;
    }
    s->crypto_off = s->crypto_len = 0;
    for (int i = 0; i < s->nb_exts; i++) {
        if (s->exts[i].type == QCOW2_EXT_CRYPTO && s->exts[i].len == 16) {
            s->crypto_off = qcow2_be64(s->exts[i].data);
            s->crypto_len = qcow2_be64(s->exts[i].data + 8);
        }
    }
    if (h->crypt_method == QCOW2_CRYPT_LUKS &&
        (!s->crypto_len || (s->crypto_off & (cs - 1)) || s->crypto_off >= (uint64_t)flen ||
         s->crypto_len > (uint64_t)flen - s->crypto_off)) {
        vd_error_setg(errp, EINVAL, "qcow2: the LUKS encryption header extension is missing "
                      "or points outside the file");
        return -EINVAL;
    }
    s->has_data_file = (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) != 0;
    s->data_file_raw = s->has_data_file && (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW);
    free(s->data_file_name);
    s->data_file_name = NULL;
    for (int i = 0; i < s->nb_exts && s->has_data_file; i++) {
        if (s->exts[i].type == QCOW2_EXT_DATA_FILE &&
            !(s->data_file_name = strndup((const char *)s->exts[i].data, s->exts[i].len))) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
            return -ENOMEM;
        }
    }
    s->compression_type = h->compression_type;
    s->extl2 = (h->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0;

    /* geometry */
    s->cluster_bits = h->cluster_bits;
    s->cluster_size = cs;
    s->l2e_size = s->extl2 ? 16 : 8;
    s->l2_bits = h->cluster_bits - (s->extl2 ? 4 : 3);
    s->l2_entries = 1ULL << s->l2_bits;
    s->sc_size = s->extl2 ? cs / QCOW2_EXTL2_SUBCLUSTERS : cs;
    s->csize_shift = 62 - (h->cluster_bits - 8);
    s->csize_mask = (1ULL << (h->cluster_bits - 8)) - 1;
    s->cluster_offset_mask = (1ULL << s->csize_shift) - 1;
    s->refcount_order = h->refcount_order;
    s->rb_bits = h->cluster_bits + 3 - h->refcount_order;
    s->refcount_max = h->refcount_order == 6 ? UINT64_MAX
                                             : (1ULL << (1u << h->refcount_order)) - 1;

    /*
     * Tables that lie outside the file (cut short, offset past EOF or 0) are damage that check
     * diagnoses from the raw file, and that qemu-img info tolerates (QEMU validates these lazily).
     * For a check or a read-only open we note it and go on (s->damaged: I/O then fails with
     * -EIO); a read-write open must refuse, since any write could make things worse.
     * Misaligned offsets and absurd sizes were refused by qcow2_header_validate, as in QEMU; an
     * open for check may also have no reference count table at all (the check reports it).
     */
    bool tolerate = (flags & VD_OPEN_CHECK) || !rw;
    s->damaged = false;
    s->snapshots_damaged = false;
    if (h->l1_size && (h->l1_table_offset == 0 ||
                       h->l1_table_offset >= (uint64_t)flen ||
                       (uint64_t)h->l1_size * 8 > (uint64_t)flen - h->l1_table_offset)) {
        if (!tolerate) {
            vd_error_setg(errp, EINVAL, "Active L1 table offset invalid");
            return -EINVAL;
        }
        s->damaged = true;
    }
    if (h->refcount_table_clusters == 0 || h->refcount_table_offset == 0 ||
        h->refcount_table_offset >= (uint64_t)flen ||
        (uint64_t)h->refcount_table_clusters * cs > (uint64_t)flen - h->refcount_table_offset) {
        if (!tolerate) {
            vd_error_setg(errp, EINVAL, "Reference count table offset invalid");
            return -EINVAL;
        }
        s->damaged = true;
    }
    if ((flags & VD_OPEN_CHECK) && h->nb_snapshots > Q2_MAX_SNAPSHOTS) {
        /* qemu-img check -r all would rewrite such a table; vdisk does not try */
        vd_error_setg(errp, EINVAL, "Snapshot table too large");
        return -EINVAL;
    }
    if (flags & VD_OPEN_CHECK) {
        /* the validator left the snapshot table to the check, which reports what is wrong */
        s->snapshots_damaged = (h->snapshots_offset & (cs - 1)) ||
                               (h->nb_snapshots && (!h->snapshots_offset ||
                                                    h->snapshots_offset >= (uint64_t)flen));
    } else if (h->nb_snapshots && !h->snapshots_offset) {
        vd_error_setg(errp, EINVAL, "Snapshot table offset invalid");
        return -EINVAL;
    } else if (h->nb_snapshots && h->snapshots_offset >= (uint64_t)flen) {
        if (!tolerate) {
            vd_error_setg(errp, EINVAL, "Snapshot table offset invalid");
            return -EINVAL;
        }
        s->snapshots_damaged = true;
    }
    s->l1_size = h->l1_size;
    s->l1_offset = h->l1_table_offset;
    return 0;
}
