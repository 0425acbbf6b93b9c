/*
 * qcow2-measure.c - qemu-img measure for qcow2: the bytes a new image needs for a size or for an
 * existing image's data, with and without preallocation. Pure arithmetic on the create options,
 * plus block status of the source; it never opens or writes an image of its own.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>

#include "formats/crypt-io.h"
#include "formats/qcow2-check.h"
#include "formats/qcow2-format.h"

static inline uint64_t div_round_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

uint64_t qcow2_refcount_metadata_size(uint64_t clusters, uint64_t cluster_size,
                                      unsigned refcount_order)
{
    /* Refcount metadata counts itself too: iterate to the fixed point. */
    uint64_t per_table_cluster = cluster_size / 8;
    uint64_t per_block = cluster_size * 8 >> refcount_order;
    uint64_t blocks = 0, table = 0, n = 0, last;
    do {
        last = n;
        blocks = div_round_up(clusters + table + blocks, per_block);
        table = div_round_up(blocks, per_table_cluster);
        n = clusters + blocks + table;
    } while (n != last);
    return (blocks + table) * cluster_size;
}

/* Bytes of a qcow2 file with every cluster of a disk of total_size allocated. */
static uint64_t prealloc_size(uint64_t total_size, uint64_t cs, unsigned refcount_order,
                              bool extl2)
{
    uint64_t l2e = extl2 ? 16 : 8;
    uint64_t aligned = div_round_up(total_size, cs) * cs;
    uint64_t meta = cs; /* header */
    uint64_t nl2e = aligned / cs;
    nl2e = div_round_up(nl2e, cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    uint64_t nl1e = nl2e * l2e / cs;
    nl1e = div_round_up(nl1e, cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += qcow2_refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    return meta + aligned;
}

int qcow2_measure(const VdCreateOptions *opts, BlockNode *src, uint64_t *required,
                  uint64_t *fully_allocated, VdError **errp)
{
    uint64_t cs = opts->cluster_size ? opts->cluster_size : (1ULL << QCOW2_DEFAULT_CLUSTER_BITS);
    if (cs < (1ULL << QCOW2_MIN_CLUSTER_BITS) || cs > (1ULL << QCOW2_MAX_CLUSTER_BITS) ||
        (cs & (cs - 1))) {
        vd_error_setg(errp, EINVAL, "Cluster size must be a power of two between %d and %dk",
                      1 << QCOW2_MIN_CLUSTER_BITS, 1 << (QCOW2_MAX_CLUSTER_BITS - 10));
        return -EINVAL;
    }
    int version = 3;
    if (opts->compat) {
        if (!strcmp(opts->compat, "0.10") || !strcmp(opts->compat, "v2")) {
            version = 2;
        } else if (strcmp(opts->compat, "1.1") && strcmp(opts->compat, "v3")) {
            vd_error_setg(errp, EINVAL, "Invalid parameter '%s'", opts->compat);
            return -EINVAL;
        }
    }
    unsigned refcount_bits = opts->refcount_bits ? (unsigned)opts->refcount_bits : 16;
    if (refcount_bits > 64 || (refcount_bits & (refcount_bits - 1))) {
        vd_error_setg(errp, EINVAL, "Refcount width must be a power of two and may not exceed "
                      "64 bits");
        return -EINVAL;
    }
    if (version < 3 && refcount_bits != 16) {
        vd_error_setg(errp, EINVAL, "Different refcount widths than 16 bits require "
                      "compatibility level 1.1 or above (use compat=1.1 or greater)");
        return -EINVAL;
    }
    unsigned refcount_order = (unsigned)__builtin_ctz(refcount_bits);
    /* Like qemu-img measure, compat=0.10 with extended_l2 is left for create to refuse. */
    if (opts->extended_l2) {
        if (cs < 16384) {
            vd_error_setg(errp, EINVAL, "Extended L2 entries are only supported with cluster "
                          "sizes of at least 16384 bytes");
            return -EINVAL;
        }
    }
    uint64_t l2e = opts->extended_l2 ? 16 : 8;
    uint64_t virtual_size = opts->size;
    if (virtual_size > (uint64_t)INT64_MAX - cs) {
        vd_error_setg(errp, EINVAL, "The image size is too large");
        return -EINVAL;
    }
    virtual_size = div_round_up(virtual_size, cs) * cs;
    uint64_t l2_tables = div_round_up(virtual_size / cs, cs / l2e);
    if (l2_tables * 8 > QCOW2_MAX_L1_SIZE) {
        vd_error_setg(errp, EINVAL, "The image size is too large (try using a larger cluster "
                      "size)");
        return -EINVAL;
    }

    uint64_t needed = 0;
    if (src) {
        int64_t ssize = vd_getlength(src);
        if (ssize < 0) {
            vd_error_setg_errno(errp, (int)-ssize, "Unable to get image virtual_size");
            return (int)ssize;
        }
        virtual_size = div_round_up((uint64_t)ssize, cs) * cs;
        if (opts->backing_file) {
            /* The new backing file may share nothing with src: assume every cluster is written. */
            needed = virtual_size;
        } else {
            uint64_t offset = 0, pnum = 0;
            for (offset = 0; offset < (uint64_t)ssize; offset += pnum) {
                VdBlockStatus st;
                memset(&st, 0, sizeof(st));
                pnum = 0;
                int ret = vd_block_status_above(src, NULL, offset, (uint64_t)ssize - offset,
                                                &pnum, &st);
                if (ret < 0) {
                    vd_error_setg_errno(errp, -ret, "Unable to get block status");
                    return ret;
                }
                if (pnum == 0) {
                    vd_error_setg(errp, EIO, "Unable to get block status: no progress");
                    return -EIO;
                }
                if (st.flags & VD_BS_ZERO) {
                    /* zero regions need no data cluster (no backing file) */
                } else if ((st.flags & (VD_BS_DATA | VD_BS_ALLOCATED)) ==
                           (VD_BS_DATA | VD_BS_ALLOCATED)) {
                    /* Count whole clusters; continue after the cluster just counted. */
                    pnum = div_round_up(offset + pnum, cs) * cs - offset;
                    needed += offset % cs + pnum;
                }
            }
        }
    }
    if (opts->prealloc == VD_PREALLOC_FULL || opts->prealloc == VD_PREALLOC_FALLOC) {
        needed = virtual_size;
    }
    uint64_t full = prealloc_size(virtual_size, cs, refcount_order, opts->extended_l2);
    /* an encrypted image's LUKS header takes whole clusters after the metadata (QEMU's count) */
    uint64_t luks = 0;
    if (opts->encrypt_format) {
        int r = vd_crypt_header_size(&opts->luks, opts->key_secret, "encrypt.key-secret", &luks,
                                     errp);
        if (r < 0) {
            return r;
        }
        luks = div_round_up(luks, cs) * cs;
    }
    *fully_allocated = full + luks;
    *required = full + luks - virtual_size + needed;
    return 0;
}
