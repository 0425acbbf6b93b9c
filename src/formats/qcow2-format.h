/*
 * qcow2-format.h - the qcow2 on-disk layout (docs/interop/qcow2.txt), shared by the driver
 * (qcow2*.c) and the offline checker (qcow2-check.c). Only constants, the decoded header and pure
 * helpers live here: nothing in this file knows about an open image.
 *
 * All on-disk integers are big-endian.
 */
#ifndef VDISK_FORMATS_QCOW2_FORMAT_H
#define VDISK_FORMATS_QCOW2_FORMAT_H

#include <endian.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "util/error.h"

#define QCOW2_MAGIC 0x514649fbU /* "QFI\xfb" */

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_DEFAULT_CLUSTER_BITS 16
#define QCOW2_V2_HEADER_SIZE 72
#define QCOW2_V3_HEADER_SIZE 104 /* through compression_type + padding */

/* incompatible_features */
#define QCOW2_INCOMPAT_DIRTY (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ULL << 4)
#define QCOW2_INCOMPAT_KNOWN                                                                 \
    (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE |             \
     QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
/* compatible_features */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ULL << 0)
/* autoclear_features */
#define QCOW2_AUTOCLEAR_BITMAPS (1ULL << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ULL << 1)

#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* Header extension types */
#define QCOW2_EXT_END 0x00000000U
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acaU
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857U
#define QCOW2_EXT_CRYPTO 0x0537be77U
#define QCOW2_CRYPT_AES 1u  /* header crypt_method: legacy AES-CBC (refused) */
#define QCOW2_CRYPT_LUKS 2u /* LUKS header in clusters named by the crypto extension */
#define QCOW2_EXT_BITMAPS 0x23852875U
#define QCOW2_EXT_DATA_FILE 0x44415441U

/* L1 / L2 entries */
#define QCOW2_OFLAG_COPIED (1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED (1ULL << 62)
#define QCOW2_OFLAG_ZERO (1ULL << 0)
#define QCOW2_L1E_OFFSET_MASK 0x00fffffffffffe00ULL
#define QCOW2_L2E_OFFSET_MASK 0x00fffffffffffe00ULL
#define QCOW2_L1E_RESERVED_MASK 0x7f000000000001ffULL
/* Extended L2: each entry is 128 bits, the second 64 hold the subcluster bitmap. */
#define QCOW2_EXTL2_SUBCLUSTERS 32
#define QCOW2_L2_BITMAP_ALL_ALLOC 0x00000000ffffffffULL
#define QCOW2_L2_BITMAP_ALL_ZEROES 0xffffffff00000000ULL

#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ULL

/* Limits we enforce when opening (QEMU's are similar): keep metadata tables sane. */
#define QCOW2_MAX_L1_SIZE (32U * 1024 * 1024)       /* bytes */
#define QCOW2_MAX_REFTABLE_SIZE (8U * 1024 * 1024)  /* bytes */
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_BACKING_NAME 1023

/* The decoded header (host byte order). */
typedef struct Qcow2Header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* v3 */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;
} Qcow2Header;

/* Bytes qcow2_header_decode reads: the v3 header through compression_type, and padding. */
#define QCOW2_HEADER_DECODE_SIZE (QCOW2_V3_HEADER_SIZE + 8)

static inline uint64_t qcow2_be64(const uint8_t *p);
static inline uint32_t qcow2_be32(const uint8_t *p);

/*
 * Decode the header's fixed fields from the first QCOW2_HEADER_DECODE_SIZE bytes of an image
 * (zero-padded where the file is shorter). Version 2 gets version 3's defaults (refcount_order 4,
 * header_length 72, no feature bits); compression_type is read only where header_length covers
 * it. Nothing is validated here: qcow2_header_validate does that.
 */
static inline void qcow2_header_decode(const uint8_t *buf, Qcow2Header *h)
{
    memset(h, 0, sizeof(*h));
    h->magic = qcow2_be32(buf);
    h->version = qcow2_be32(buf + 4);
    h->backing_file_offset = qcow2_be64(buf + 8);
    h->backing_file_size = qcow2_be32(buf + 16);
    h->cluster_bits = qcow2_be32(buf + 20);
    h->size = qcow2_be64(buf + 24);
    h->crypt_method = qcow2_be32(buf + 32);
    h->l1_size = qcow2_be32(buf + 36);
    h->l1_table_offset = qcow2_be64(buf + 40);
    h->refcount_table_offset = qcow2_be64(buf + 48);
    h->refcount_table_clusters = qcow2_be32(buf + 56);
    h->nb_snapshots = qcow2_be32(buf + 60);
    h->snapshots_offset = qcow2_be64(buf + 64);
    if (h->version < 3) {
        h->refcount_order = 4;
        h->header_length = QCOW2_V2_HEADER_SIZE;
        return;
    }
    h->incompatible_features = qcow2_be64(buf + 72);
    h->compatible_features = qcow2_be64(buf + 80);
    h->autoclear_features = qcow2_be64(buf + 88);
    h->refcount_order = qcow2_be32(buf + 96);
    h->header_length = qcow2_be32(buf + 100);
    if (h->header_length > 104) {
        h->compression_type = buf[104];
    }
}

/* qcow2_header_validate flags */
#define QCOW2_VALIDATE_RDWR 1u   /* opened for writing: a corrupt image is refused... */
#define QCOW2_VALIDATE_REPAIR 2u /* ...unless opened to be checked / repaired, which also accepts
                                    an image without a reference count table and leaves the
                                    snapshot table to the check (as QEMU's BDRV_O_CHECK) */

/*
 * The one validator of the header's fixed fields, for the driver's open and the checker alike:
 * QEMU's open-time rules in QEMU's order, failing with QEMU's message (what qemu-img prints
 * after "Could not open 'FILE': ") and a negative errno. cl/cl_len: the header cluster as read
 * (zero-padded past EOF; NULL is allowed), where the feature name table names unknown
 * incompatible features. Extensions, the backing file name's bytes and whether the tables lie
 * inside the file are the caller's concern.
 */
int qcow2_header_validate(const Qcow2Header *h, const uint8_t *cl, uint64_t cl_len,
                          unsigned flags, VdError **errp);

/* Cluster types as the L2 entry says (per subcluster with extended L2). */
typedef enum {
    QCOW2_CLUSTER_UNALLOCATED,
    QCOW2_CLUSTER_ZERO_PLAIN, /* zero flag, no host cluster */
    QCOW2_CLUSTER_ZERO_ALLOC, /* zero flag, host cluster kept (preallocated) */
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_COMPRESSED
} Qcow2ClusterType;

static inline uint64_t qcow2_be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

static inline uint32_t qcow2_be32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}

static inline void qcow2_put_be64(uint8_t *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static inline void qcow2_put_be32(uint8_t *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}

/*
 * One header extension (type, length, data): whether its data lies before the extensions' end
 * is in fits, and the caller says what an overlong one means (the driver's open and the checker
 * word it as qemu-img's open and check do, and test it before or after the end marker).
 */
typedef struct Qcow2ExtView {
    uint32_t type;
    uint32_t len;
    const uint8_t *data;
    bool fits;
} Qcow2ExtView;

/*
 * The one walk over the header extensions in buf[0, end): the extension at *off into *e, and *off
 * moved past it (its data padded to 8 bytes). False when fewer than 8 bytes are left before end.
 */
static inline bool qcow2_ext_next(const uint8_t *buf, uint64_t end, uint64_t *off, Qcow2ExtView *e)
{
    if (*off > end || end - *off < 8) {
        return false;
    }
    e->type = qcow2_be32(buf + *off);
    e->len = qcow2_be32(buf + *off + 4);
    e->data = buf + *off + 8;
    e->fits = e->len <= end - *off - 8;
    *off += 8 + ((e->len + 7ULL) & ~7ULL);
    return true;
}

/* Offsets and size of a compressed cluster descriptor (L2 entry without flags). */
static inline void qcow2_compressed_extent(uint64_t l2_entry, uint32_t cluster_bits,
                                           uint64_t *host_offset, uint64_t *nb_bytes)
{
    uint32_t csize_shift = 62 - (cluster_bits - 8);
    uint64_t offset_mask = (1ULL << csize_shift) - 1;
    uint64_t nb_sectors = ((l2_entry >> csize_shift) & ((1ULL << (cluster_bits - 8)) - 1)) + 1;
    *host_offset = l2_entry & offset_mask;
    /* The sector count covers from the start of the host offset's 512-byte sector. */
    *nb_bytes = nb_sectors * 512 - (*host_offset & 511);
}

#endif
