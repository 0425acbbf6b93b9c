/*
 * qcow2-check-int.h - what the two halves of the offline checker share: the check state (Chk), the
 * format limits it enforces, and the helpers each half calls in the other. qcow2-check.c loads the
 * header and tables and runs the passes; qcow2-check-refcount.c counts references and checks,
 * repairs or rebuilds the refcount structures; qcow2-check-amend.c reuses both to rewrite an image
 * for amend. Nothing outside these three files includes this.
 */
#ifndef VDISK_FORMATS_QCOW2_CHECK_INT_H
#define VDISK_FORMATS_QCOW2_CHECK_INT_H

#include <stdbool.h>
#include <stdint.h>

#include "formats/qcow2-check.h"
#include "formats/qcow2-format.h"

/* Limits (the same as QEMU's, so the same images are accepted). */
#define CHK_MAX_SNAPSHOTS ((uint32_t)QCOW2_MAX_SNAPSHOTS)
#define CHK_MAX_SNAPSHOT_EXTRA 1024U
#define CHK_MAX_SNAPSHOTS_SIZE (1024ULL * CHK_MAX_SNAPSHOTS)
#define CHK_SNAPSHOT_HEADER_SIZE 40
#define CHK_MAX_BITMAPS 65535U
#define CHK_MAX_BITMAP_DIR_SIZE (1024ULL * CHK_MAX_BITMAPS)
#define CHK_BITMAP_DIR_ENTRY_SIZE 24
#define CHK_MAX_BITMAP_DATA (64ULL << 20)
#define CHK_BME_RESERVED_MASK 0xff000000000001feULL
#define CHK_BME_OFFSET_MASK 0x00fffffffffffe00ULL
#define CHK_BME_ALL_ONES 1ULL
#define CHK_L2E_STD_RESERVED_MASK 0x3f000000000001feULL
#define CHK_REFT_RESERVED_MASK 0x1ffULL
/* Refuse to allocate the in-memory refcount array beyond this many clusters (as QEMU: INT_MAX). */
#define CHK_MAX_CLUSTERS 0x7fffffffULL

typedef struct ChkSnapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint16_t id_size;
    uint16_t name_size;
    uint8_t hdr[40];      /* the entry's fixed part as stored (for rewriting the table) */
    uint8_t *extra;       /* extra data kept (at most CHK_MAX_SNAPSHOT_EXTRA bytes) */
    uint32_t extra_size;
} ChkSnapshot;

typedef struct Chk {
    BlockNode *file;
    VdCheckResult *res;
    int fix;
    bool quiet;
    uint64_t file_size;

    Qcow2Header h;
    uint32_t cluster_bits;
    uint64_t cluster_size;
    bool extl2;
    bool data_file;
    uint32_t l2_entry_size;
    uint64_t l2_entries;
    uint32_t csize_shift;
    uint64_t csize_mask;
    uint64_t cluster_offset_mask;
    uint32_t refcount_order;
    uint64_t refcount_max;
    uint32_t rb_bits; /* log2(refcount entries per refcount block) */

    uint64_t *reftable; /* host order, as stored (flags included) */
    uint64_t reftable_entries;
    uint64_t reftable_offset;

    uint64_t *l1; /* active L1, host order */
    uint32_t l1_size;
    uint64_t l1_offset;

    ChkSnapshot *snaps;
    uint32_t nb_snaps;
    uint64_t snapshots_offset;
    uint64_t snapshots_size;
    int snap_corruptions;  /* entries to rewrite (incomplete / too much extra data) */
    uint32_t snap_reduced; /* snapshots discarded by a repair (header count lowered) */

    uint32_t nb_bitmaps;
    uint64_t bm_dir_offset;
    uint64_t bm_dir_size;

    uint64_t crypto_offset;
    uint64_t crypto_length;

    /* Computed references, one per host cluster. */
    uint32_t *refs;
    uint64_t refs_alloc;
    uint64_t nb_clusters;
    uint32_t refs_cap;

    /* One cached stored refcount block (write-back while repairing). */
    uint8_t *rb_buf;
    uint64_t rb_offset;
    bool rb_valid;
    bool rb_dirty;
} Chk;

/* A per-problem line on stderr (qemu-img check's wording), unless the check is quiet. */
void chk_say(Chk *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Read [offset, offset+len) of the file; what lies past its end reads as zeroes. */
int chk_read_padded(Chk *c, uint64_t offset, uint64_t len, void *buf);
/* Write inside the file (never grows it: -EINVAL past the end). */
int chk_write_file(Chk *c, uint64_t offset, uint64_t len, const void *buf);

static inline uint64_t div_round_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

static inline uint64_t off_in_cluster(Chk *c, uint64_t off)
{
    return off & (c->cluster_size - 1);
}

/* ---- qcow2-check.c ---- */
/* Load header and tables (active L1, reftable, snapshots); refusals set errp. */
int chk_load(Chk *c, VdError **errp);
void chk_free_tables(Chk *c);
int chk_load_u64_table(Chk *c, uint64_t offset, uint64_t entries, uint64_t **out);

/* ---- qcow2-check-refcount.c ---- */
int chk_calculate_refcounts(Chk *c, bool *rebuild);
int chk_check_oflag_copied(Chk *c, int fix);
void chk_compare_refcounts(Chk *c, int fix, bool *rebuild, uint64_t *highest);
bool chk_has_refblock(Chk *c, uint64_t k);
int chk_rb_writeback(Chk *c);
/*
 * Write a new refcount structure from c->refs with c->refcount_order (which may differ from the
 * header's: the header switch writes the new order with the new table, in one write).
 */
int chk_rebuild_refcounts(Chk *c);
int chk_set_stored_refcount(Chk *c, uint64_t idx, uint64_t val);
int chk_stored_refcount(Chk *c, uint64_t idx, uint64_t *val);

#endif
