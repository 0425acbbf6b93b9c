/*
 * qcow2-format.c - the one validator of a qcow2 header's fixed fields, shared by the driver's open
 * (qcow2-header.c) and the offline checker (qcow2-check.c). It applies QEMU's open-time rules in
 * QEMU's order with QEMU's messages, so `vdisk` fails on the same field as qemu-img with the same
 * words. Pure: it reads the decoded header and the header cluster's bytes, never the file.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>

#include "formats/qcow2-format.h"

#define QCOW2_SNAPSHOT_HEADER_SIZE 40 /* the fixed part of a snapshot table entry */
#define QCOW2_MAX_VIRTUAL_SIZE (1ULL << 62) /* vdisk's bound for its offset arithmetic */

/*
 * A feature named by the feature name table extension of the header cluster, else QEMU's
 * "Unknown incompatible feature: <mask>". Extensions run from header_length to the backing
 * file name (or the cluster's end).
 */
static void feature_name(const Qcow2Header *h, const uint8_t *cl, uint64_t cl_len, int bit,
                         char *buf, size_t len)
{
    uint64_t end = h->backing_file_offset ? h->backing_file_offset : cl_len;
    end = end < cl_len ? end : cl_len;
    uint64_t off = h->header_length;
    Qcow2ExtView ext;
    while (cl && qcow2_ext_next(cl, end, &off, &ext)) {
        if (ext.type == QCOW2_EXT_END || !ext.fits) {
            break;
        }
        for (uint32_t o = 0; ext.type == QCOW2_EXT_FEATURE_TABLE && o + 48 <= ext.len; o += 48) {
            const uint8_t *e = ext.data + o;
            if (e[0] == 0 && e[1] == bit) {
                snprintf(buf, len, "%.46s", (const char *)e + 2);
                return;
            }
        }
    }
    snprintf(buf, len, "Unknown incompatible feature: %llx", 1ULL << bit);
}

/* QEMU's table check: at most max_bytes of entries, cluster aligned, not past INT64_MAX. */
static int check_table(uint64_t offset, uint64_t entries, uint64_t entry_len, uint64_t max_bytes,
                       uint64_t cluster_size, const char *name, VdError **errp)
{
    if (entries > max_bytes / entry_len) {
        vd_error_setg(errp, EINVAL, "%s too large", name);
        return -EINVAL;
    }
    if ((uint64_t)INT64_MAX - entries * entry_len < offset || (offset & (cluster_size - 1))) {
        vd_error_setg(errp, EINVAL, "%s offset invalid", name);
        return -EINVAL;
    }
    return 0;
}

int qcow2_header_validate(const Qcow2Header *h, const uint8_t *cl, uint64_t cl_len,
                          unsigned flags, VdError **errp)
{
    if (h->magic != QCOW2_MAGIC) {
        vd_error_setg(errp, EINVAL, "Image is not in qcow2 format");
        return -EINVAL;
    }
    if (h->version < 2 || h->version > 3) {
        vd_error_setg(errp, ENOTSUP, "Unsupported qcow2 version %" PRIu32, h->version);
        return -ENOTSUP;
    }
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        vd_error_setg(errp, EINVAL, "Unsupported cluster size: 2^%" PRIu32, h->cluster_bits);
        return -EINVAL;
    }
    uint64_t cs = 1ULL << h->cluster_bits;
    if (h->version == 3 && h->header_length < QCOW2_V3_HEADER_SIZE) {
        vd_error_setg(errp, EINVAL, "qcow2 header too short");
        return -EINVAL;
    }
    if (h->header_length > cs) {
        vd_error_setg(errp, EINVAL, "qcow2 header exceeds cluster size");
        return -EINVAL;
    }
    if (h->backing_file_offset > cs) {
        vd_error_setg(errp, EINVAL, "Invalid backing file offset");
        return -EINVAL;
    }
    if (h->compression_type > QCOW2_COMPRESSION_ZSTD) {
        vd_error_setg(errp, ENOTSUP, "qcow2: unknown compression type: %u", h->compression_type);
        return -ENOTSUP;
    }
    bool comp_bit = h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION;
    if (comp_bit != (h->compression_type != QCOW2_COMPRESSION_ZLIB)) {
        vd_error_setg(errp, EINVAL, "qcow2: Compression type incompatible feature bit must %sbe set",
                      comp_bit ? "not " : "");
        return -EINVAL;
    }
    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
    if (unknown) {
        char msg[512] = "", name[80];
        for (int b = 0; b < 64; b++) {
            if (unknown & (1ULL << b)) {
                size_t l = strlen(msg);
                feature_name(h, cl, cl_len, b, name, sizeof(name));
                snprintf(msg + l, sizeof(msg) - l, "%s%s", l ? ", " : "", name);
            }
        }
        vd_error_setg(errp, ENOTSUP, "Unsupported qcow2 feature(s): %s", msg);
        return -ENOTSUP;
    }
    if ((h->incompatible_features & QCOW2_INCOMPAT_CORRUPT) && (flags & QCOW2_VALIDATE_RDWR) &&
        !(flags & QCOW2_VALIDATE_REPAIR)) {
        vd_error_setg(errp, EACCES, "qcow2: Image is corrupt; cannot be opened read/write");
        return -EACCES;
    }
    if (h->refcount_order > 6) {
        vd_error_setg(errp, EINVAL,
                      "Reference count entry width too large; may not exceed 64 bits");
        return -EINVAL;
    }
    bool extl2 = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;
    if (extl2 && cs / QCOW2_EXTL2_SUBCLUSTERS < (1u << QCOW2_MIN_CLUSTER_BITS)) {
        vd_error_setg(errp, EINVAL, "Unsupported subcluster size: %" PRIu64,
                      cs / QCOW2_EXTL2_SUBCLUSTERS);
        return -EINVAL;
    }
    if (h->refcount_table_clusters == 0 && !(flags & QCOW2_VALIDATE_REPAIR)) {
        vd_error_setg(errp, EINVAL, "Image does not contain a reference count table");
        return -EINVAL;
    }
    int ret = check_table(h->refcount_table_offset, h->refcount_table_clusters, cs,
                          QCOW2_MAX_REFTABLE_SIZE, cs, "Reference count table", errp);
    if (ret == 0 && !(flags & QCOW2_VALIDATE_REPAIR)) {
        /* a check reads the snapshot table itself, and reports (or discards) what is wrong */
        ret = check_table(h->snapshots_offset, h->nb_snapshots, QCOW2_SNAPSHOT_HEADER_SIZE,
                          QCOW2_SNAPSHOT_HEADER_SIZE * QCOW2_MAX_SNAPSHOTS, cs,
                          "Snapshot table", errp);
    }
    if (ret == 0) {
        ret = check_table(h->l1_table_offset, h->l1_size, 8, QCOW2_MAX_L1_SIZE, cs,
                          "Active L1 table", errp);
    }
    if (ret < 0) {
        return ret;
    }
    uint64_t per_l1 = cs * (cs / (extl2 ? 16 : 8)); /* guest bytes one L2 table maps */
    uint64_t need_l1 = h->size / per_l1 + (h->size % per_l1 != 0);
    if (need_l1 > INT_MAX || h->size > QCOW2_MAX_VIRTUAL_SIZE) {
        vd_error_setg(errp, EFBIG, "Image is too big");
        return -EFBIG;
    }
    if (h->l1_size < need_l1) {
        vd_error_setg(errp, EINVAL, "L1 table is too small");
        return -EINVAL;
    }
    if (h->crypt_method > QCOW2_CRYPT_LUKS) {
        vd_error_setg(errp, ENOTSUP, "Unsupported encryption method %" PRIu32, h->crypt_method);
        return -ENOTSUP;
    }
    if (h->backing_file_offset &&
        h->backing_file_size > (cs - h->backing_file_offset < QCOW2_MAX_BACKING_NAME
                                    ? cs - h->backing_file_offset : QCOW2_MAX_BACKING_NAME)) {
        vd_error_setg(errp, EINVAL, "Backing file name too long");
        return -EINVAL;
    }
    return 0;
}
