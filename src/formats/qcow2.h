/*
 * qcow2.h - internal state of the qcow2 driver (vd_drv_qcow2), shared by qcow2.c (open/create/
 * header), qcow2-cluster.c (guest->host mapping and data paths), qcow2-zero.c (write-zeroes and
 * discard) and qcow2-refcount.c (metadata caches, refcounts, cluster allocator). Nothing here is
 * a public contract.
 *
 * Locking: every field of Qcow2State is protected by s->lock, which each vtable entry point holds
 * for the whole request, except the data I/O of reads of NORMAL clusters and in-place overwrites
 * (see "lockless data I/O" in qcow2.c). Functions named q2_* assume the lock is held.
 */
#ifndef VDISK_FORMATS_QCOW2_H
#define VDISK_FORMATS_QCOW2_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "formats/crypt-io.h"
#include "formats/qcow2-format.h"

/* QEMU writes header_length 112 for v3 (compression_type byte + 7 bytes of padding). */
#define Q2_V3_HEADER_LEN_CT 112
#define Q2_L2_CACHE_MAX_BYTES (32ULL * 1024 * 1024)
#define Q2_RB_CACHE_MIN_ENTRIES 16
#define Q2_MAX_SNAPSHOTS QCOW2_MAX_SNAPSHOTS
#define Q2_MAX_BACKING_NAME QCOW2_MAX_BACKING_NAME
#define Q2_MAX_PENDING_FREES 512
/* Host offsets must fit in the 56-bit offset field of L1/L2 entries. */
#define Q2_MAX_HOST_OFFSET (1ULL << 56)

typedef struct Qcow2CacheEntry {
    uint64_t offset; /* host offset of the table; 0 = slot empty */
    uint8_t *data;
    int ref;         /* pinned while > 0: never evicted */
    bool dirty;
    bool referenced; /* clock bit */
    int hnext;       /* hash chain */
} Qcow2CacheEntry;

/*
 * A write-back cache of cluster-sized metadata tables (L2 tables or refcount blocks).
 * `depends`: before any dirty table of this cache is written, `depends` is written back and the
 * file flushed (the ordering rules in qcow2.c).
 */
typedef struct Qcow2Cache {
    Qcow2CacheEntry *e;
    uint8_t *base;   /* n tables of cs bytes, contiguous: entry i's data is base + i * cs */
    uint64_t cs;
    int n;
    int *buckets;
    int nbuckets;
    int hand;
    struct Qcow2Cache *depends;
    uint64_t dirtied; /* bumped by each q2_cache_mark_dirty */
    bool is_l2;
} Qcow2Cache;

typedef struct Qcow2Ext {
    uint32_t type;
    uint32_t len;
    uint8_t *data;
} Qcow2Ext;

/* Guest clusters [start, end) an allocating write is filling without the lock (its stack). */
typedef struct Q2AllocInFlight {
    uint64_t start, end;
    struct Q2AllocInFlight *next;
} Q2AllocInFlight;

typedef struct Qcow2State {
    pthread_mutex_t lock;
    /*
     * Lockless data I/O (qcow2.c header): requests that mapped their range under the lock and
     * now read/overwrite host clusters without it. Anything that may free or repurpose a host
     * cluster first waits (q2_lockless_wait_idle) until this is 0; while someone waits
     * (lockless_waiters > 0) no new lockless I/O starts, so the wait always ends.
     */
    unsigned lockless_inflight;
    unsigned lockless_waiters;
    pthread_cond_t lockless_idle;
    /*
     * Allocating writes whose data I/O runs without the lock (also counted in
     * lockless_inflight): another write of the same guest clusters waits on alloc_done.
     */
    struct Q2AllocInFlight *allocs;
    pthread_cond_t alloc_done;
    uint64_t size_pub;     /* h.size, read with __atomic_load_n without the lock (getlength) */
    BlockNode *bs;
    Qcow2Header h;
    uint8_t *hdr_raw;      /* the header as read, header_length bytes (keeps unknown fields) */
    uint32_t hdr_raw_len;

    uint32_t cluster_bits;
    uint64_t cluster_size;
    uint32_t l2_bits;      /* log2(entries per L2 table) */
    uint64_t l2_entries;
    uint32_t l2e_size;     /* 8, or 16 with extended L2 */
    bool extl2;
    uint64_t sc_size;      /* subcluster size (== cluster_size without extended L2) */
    uint32_t csize_shift;
    uint64_t csize_mask;
    uint64_t cluster_offset_mask;

    uint64_t *l1;          /* host byte order, l1_size entries */
    uint32_t l1_size;
    uint64_t l1_offset;

    uint64_t *reftable;    /* host byte order */
    uint64_t reftable_size; /* entries */
    uint64_t reftable_offset;
    uint32_t refcount_order;
    uint32_t rb_bits;      /* log2(refcount entries per refcount block) */
    uint64_t refcount_max;

    Qcow2Cache l2_cache;
    Qcow2Cache rb_cache;

    uint64_t free_cluster_index;
    uint64_t scan_limit;   /* allocator sanity bound (clusters), refreshed from the file size */
    uint64_t free_byte_offset; /* compressed-data packing cursor; 0 = none */
    bool data_dirty;       /* data written since the last file flush */
    uint64_t data_gen;     /* bumped with each data_dirty = true (q2_data_written) */
    /*
     * L2 entries replaced by copy-on-write whose clusters are not released yet: batching the
     * decrements avoids a flush per overwritten shared/compressed cluster. Applied at flush or
     * when Q2_MAX_PENDING_FREES accumulate; lost on a crash, which only leaks.
     */
    uint64_t *pending_frees;
    size_t nb_pending_frees;
    size_t cap_pending_frees;

    Qcow2Ext *exts;        /* extensions other than backing format / end, in file order */
    int nb_exts;
    /*
     * encrypt.format=luks (crypt_method 2): the LUKS header's clusters (the crypto header
     * extension) and the unlocked cipher; data clusters are encrypted in 512-byte sectors with
     * the host offset as IV (as QEMU does). crypt.luks is NULL on a plain image.
     */
    uint64_t crypto_off, crypto_len;
    VdCryptIO crypt;
    /*
     * External data file (incompatible bit 2, the data file extension): guest data lives in
     * bs->data_file at the guest offset (host offset == guest offset, so an L2 entry with
     * OFLAG_COPIED and offset 0 is cluster 0's data), no data cluster is refcounted, compression
     * and internal snapshots are refused. data_file_raw (autoclear bit 1): the data file stays a
     * valid raw image, so zeroing keeps its bytes zero too. has_data_file with bs->data_file
     * NULL: a metadata-only open (info) whose data file could not be opened; data I/O fails
     * with -EIO. The node is the BlockNode's data_file child (the generic layer frees it).
     */
    bool has_data_file;
    bool data_file_raw;
    char *data_file_name;  /* as the extension records it */
    char *backing_file;
    char *backing_fmt;

    uint8_t compression_type;
    bool read_only;
    /*
     * Opened for check or read-only inspection although the L1 or refcount table lies outside
     * the file (or on the header): l1/reftable are not loaded and every data, status or metadata
     * request fails with -EIO. Only info and check (which reads the raw file) work.
     */
    bool damaged;
    /*
     * The snapshot table lies outside the file (allowed for read-only / check opens only); info
     * lists what reads there, zeroes, as QEMU does.
     */
    bool snapshots_damaged;
    /*
     * Metadata preallocation detected (QEMU's heuristic: far more clusters referenced than the
     * host file really stores): block status then marks data VD_BS_RECURSE so holes in the
     * file show as zero. -1 = not checked yet (checked lazily, on the first block status).
     */
    int metadata_prealloc;
    /*
     * Lazy refcounts (compat bit set, opened read-write, v3): the first write sets the dirty bit
     * (durably) and from then on refcount increments need not reach the disk before the L2
     * entries or L2 tables that use them; they are written at flush/close or on eviction. A
     * crash leaves stale refcounts behind the dirty bit; the next read-write open repairs them.
     * set_dirty: this open set the bit, so a clean close clears it.
     */
    bool lazy_refcounts;
    bool set_dirty;
    /*
     * The bitmaps extension is in the dirty-bitmap module's hands (qcow2-bitmap.c loaded it):
     * first_write keeps autoclear bit 0 and close stores the bitmaps. Without it (check opens,
     * damaged images) the bit is cleared at the first write, as for any unknown autoclear bit.
     */
    bool bitmaps_loaded;
} Qcow2State;

/* Are refcount updates deferred right now (lazy refcounts and the dirty bit is on disk)? */
static inline bool q2_refcounts_lazy(const Qcow2State *s)
{
    return s->lazy_refcounts && (s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY);
}

/* Guest data went to the file (lock held): the next L2 write-back syncs the file first. */
static inline void q2_data_written(Qcow2State *s)
{
    s->data_dirty = true;
    s->data_gen++;
}

/* The node guest data clusters live in: the external data file, else the image file. */
static inline BlockNode *q2_data_node(const Qcow2State *s)
{
    return s->has_data_file ? s->bs->data_file : s->bs->file;
}

/*
 * Does an (uncompressed) L2 entry map host data? Offset 0 is unallocated in the image file but
 * a valid data file offset: there, OFLAG_COPIED says it is mapped (every data file cluster has
 * refcount 1, as QEMU's qcow2_get_cluster_type reads it).
 */
static inline bool q2_l2e_has_host(const Qcow2State *s, uint64_t e)
{
    return (e & QCOW2_L2E_OFFSET_MASK) || (s->has_data_file && (e & QCOW2_OFLAG_COPIED));
}

static inline Qcow2State *q2_state(BlockNode *bs)
{
    return (Qcow2State *)bs->opaque;
}

/* ---- qcow2-refcount.c: caches ---- */
int q2_cache_init(Qcow2Cache *c, int entries, uint64_t cluster_size, bool is_l2);
void q2_cache_destroy(Qcow2Cache *c);
/* Get (loading if needed) the table at offset; pinned until q2_cache_put. */
int q2_cache_get(Qcow2State *s, Qcow2Cache *c, uint64_t offset, uint8_t **table);
/* Same, but the table is new: no read, contents zeroed. */
int q2_cache_get_empty(Qcow2State *s, Qcow2Cache *c, uint64_t offset, uint8_t **table);
void q2_cache_put(Qcow2Cache *c, uint8_t **table);
void q2_cache_mark_dirty(Qcow2Cache *c, uint8_t *table);
int q2_cache_flush(Qcow2State *s, Qcow2Cache *c);
/*
 * Write c's dirty tables each durably (VD_REQ_FUA: a sync of just that range), after their
 * dependencies (which a whole-file flush settles, as in q2_cache_flush). For ordering a few
 * metadata writes without syncing every other dirty byte of the file.
 */
int q2_cache_write_durable(Qcow2State *s, Qcow2Cache *c);
/* Drop every entry (after flushing when flush is true). */
int q2_cache_empty(Qcow2State *s, Qcow2Cache *c, bool flush);
/* Forget a table (when its cluster is freed) without writing it. */
void q2_cache_discard(Qcow2Cache *c, uint64_t offset);
/* Record that c's dirty tables may only be written after dep's (see qcow2.c). */
int q2_cache_set_dependency(Qcow2State *s, Qcow2Cache *c, Qcow2Cache *dep);
/*
 * Write back every dirty table (L2, refcount blocks) and apply deferred frees, in dependency
 * order; the file is then consistent in the page cache and only its flush is missing. Lock held.
 */
int q2_writeback_all(Qcow2State *s);
/* q2_writeback_all, then flush the file (lock held throughout). */
int q2_flush_all(Qcow2State *s);
int q2_file_flush(Qcow2State *s);

/* ---- qcow2-refcount.c: refcounts ---- */
int q2_load_reftable(Qcow2State *s, VdError **errp);
int q2_get_refcount(Qcow2State *s, uint64_t cluster_index, uint64_t *refcount);
/* Add `addend` (+1/-1...) to the refcounts of clusters covering [offset, offset+length). */
int q2_update_refcount(Qcow2State *s, uint64_t offset, uint64_t length, int64_t addend);
/* Allocate n contiguous clusters (refcount 1); returns the host offset. */
int q2_alloc_clusters(Qcow2State *s, uint64_t n, uint64_t *host);
/* Allocate `bytes` (< cluster size) inside shared clusters for compressed data. */
int q2_alloc_bytes(Qcow2State *s, uint64_t bytes, uint64_t *host);
/* Release whatever an L2 entry references (normal, preallocated-zero or compressed). */
int q2_free_l2_entry_cluster(Qcow2State *s, uint64_t l2_entry);
int q2_free_clusters(Qcow2State *s, uint64_t offset, uint64_t length);
/* Release the cluster(s) of a replaced L2 entry later (batched); see pending_frees. */
int q2_defer_free_l2_entry(Qcow2State *s, uint64_t l2_entry);
int q2_apply_pending_frees(Qcow2State *s);
uint64_t q2_refblock_get(const Qcow2State *s, const uint8_t *rb, uint64_t index);
void q2_refblock_set(const Qcow2State *s, uint8_t *rb, uint64_t index, uint64_t value);

/* ---- qcow2-cluster.c: L2 entries and the mapping (shared with qcow2-zero.c) ---- */
typedef struct Q2Extent {
    Qcow2ClusterType type;
    uint64_t host;  /* host offset of the extent's first byte (NORMAL, ZERO_ALLOC) */
    bool host_valid; /* host means something (offset 0 is valid in an external data file) */
    uint64_t entry; /* L2 entry of the first cluster (COMPRESSED) */
    uint64_t len;
} Q2Extent;

static inline uint64_t q2_l2e_get(const Qcow2State *s, const uint8_t *l2, uint64_t i)
{
    return qcow2_be64(l2 + i * s->l2e_size);
}

static inline uint64_t q2_l2e_bitmap(const Qcow2State *s, const uint8_t *l2, uint64_t i)
{
    return s->extl2 ? qcow2_be64(l2 + i * 16 + 8) : 0;
}

static inline void q2_l2e_set(const Qcow2State *s, uint8_t *l2, uint64_t i, uint64_t e, uint64_t bm)
{
    qcow2_put_be64(l2 + i * s->l2e_size, e);
    if (s->extl2) {
        qcow2_put_be64(l2 + i * 16 + 8, bm);
    }
}

static inline bool q2_has_zero_flag(const Qcow2State *s)
{
    return s->h.version >= 3 && !s->extl2;
}

/* Cluster-level type (ignores extended-L2 bitmaps). */
Qcow2ClusterType q2_cluster_type(const Qcow2State *s, uint64_t e);
/*
 * The longest run from offset (<= bytes) whose (sub)clusters share one type (and for NORMAL /
 * ZERO_ALLOC, contiguous host offsets); compressed clusters merge only when merge_compressed.
 */
int q2_get_extent(Qcow2State *s, uint64_t offset, uint64_t bytes, bool merge_compressed,
                  Q2Extent *x);
/* The L2 table for l1i, writable (a shared one copied, a missing one created); pinned. */
int q2_get_l2_for_write(Qcow2State *s, uint64_t l1i, uint8_t **l2);
/*
 * The data of an allocating write into the k host clusters at host, for guest [offset, end) in
 * me's clusters, with its head/tail copy-on-write (head_mode/tail_mode: 1 zero the cluster, 2 the
 * merged buffer in *hbuf / *tbuf). May run without s->lock.
 */
int q2_write_new_clusters(Qcow2State *s, const Q2AllocInFlight *me, uint64_t host, uint64_t k,
                          int head_mode, int tail_mode, bool head_backing, bool tail_backing,
                          uint8_t **hbuf, uint8_t **tbuf, const uint8_t *buf, uint64_t offset,
                          uint64_t end);

/* ---- qcow2-zero.c ---- */
/* Does the guest cluster at cstart read as zeroes (clipped to the virtual size)? */
int q2_cluster_reads_zero(Qcow2State *s, uint64_t cstart, bool *zero);
/* Does no layer of the backing chain allocate [off, off + n)? (needs no s->lock) */
int q2_backing_range_unallocated(Qcow2State *s, uint64_t off, uint64_t n, bool *zero);
int q2_zero(Qcow2State *s, uint64_t offset, uint64_t bytes, int flags);
int q2_discard(Qcow2State *s, uint64_t offset, uint64_t bytes, int flags);

/* ---- qcow2-cluster.c: data paths ---- */
int q2_read(Qcow2State *s, uint64_t offset, uint64_t bytes, uint8_t *buf);
int q2_write(Qcow2State *s, uint64_t offset, uint64_t bytes, const uint8_t *buf);
/*
 * The same, but reads of NORMAL clusters and in-place overwrites of COPIED clusters may drop
 * s->lock around their data I/O (lockless data I/O; only for vtable pread/pwrite, which hold
 * nothing else across the call). s->lock is held again on return.
 */
int q2_read_unlocked_data(Qcow2State *s, uint64_t offset, uint64_t bytes, uint8_t *buf);
int q2_write_unlocked_data(Qcow2State *s, uint64_t offset, uint64_t bytes, const uint8_t *buf);
/*
 * Wait (s->lock held, dropped while waiting) until no lockless data I/O is in flight. Call it at
 * the start of any request that may free or repurpose a host cluster, before changing anything:
 * the lock is released while waiting, so no half-done state may be visible then.
 */
void q2_lockless_wait_idle(Qcow2State *s);
/* Unit tests only: microseconds to sleep inside each lockless window (widens races). */
extern unsigned q2_test_lockless_delay_us;
/* Publish s->h.size for lock-free readers (call under the lock whenever h.size changes). */
static inline void q2_publish_size(Qcow2State *s)
{
    __atomic_store_n(&s->size_pub, s->h.size, __ATOMIC_RELEASE);
}
/*
 * Compressed writes, in two steps so the costly one runs without s->lock:
 * q2_compress_cluster (no lock needed; in and out are cluster-sized scratch buffers) compresses
 * the n bytes at buf for the cluster at offset (whole clusters, or the image's tail) into out and
 * returns the compressed length, 0 when the data does not compress (store it plainly), or
 * -EINVAL for a misaligned request. q2_write_compressed_cluster (s->lock held) allocates, writes
 * out and updates the L2 entry, or writes buf plainly when clen is 0.
 */
int q2_compress_cluster(Qcow2State *s, uint64_t offset, uint64_t n, const uint8_t *buf,
                        uint8_t *in, uint8_t *out);
int q2_write_compressed_cluster(Qcow2State *s, uint64_t offset, uint64_t n, const uint8_t *buf,
                                const uint8_t *out, int clen);
int q2_block_status(Qcow2State *s, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                    uint64_t *map);
/* Give every unallocated cluster in [offset, end) a host cluster (preallocation). */
int q2_preallocate(Qcow2State *s, uint64_t offset, uint64_t end, VdPrealloc mode);
/* Grow the L1 table to at least min_size entries. */
int q2_grow_l1(Qcow2State *s, uint64_t min_size);
int q2_compress(Qcow2State *s, const uint8_t *src, uint8_t *dst, uint64_t dst_len);
int q2_decompress(Qcow2State *s, const uint8_t *src, uint64_t src_len, uint8_t *dst);

/* ---- qcow2-header.c: the header cluster ---- */
int q2_write_header_field(Qcow2State *s, uint64_t off, const void *data, uint32_t len);
/* Parse and validate the header; fills s->h, geometry, extensions and backing names. */
int q2_parse_header(BlockNode *bs, Qcow2State *s, int flags, VdError **errp);
/* The whole header cluster from s; -ENOSPC if it does not fit in the first cluster. */
int q2_build_header(Qcow2State *s, uint8_t *buf);
int q2_add_ext(Qcow2State *s, uint32_t type, const uint8_t *data, uint32_t len);
void q2_free_exts(Qcow2State *s);
/* Add the feature name table extension (create). */
int q2_add_feature_table(Qcow2State *s);

/* ---- qcow2-create.c ---- */
int q2_create(const char *filename, const VdCreateOptions *o, VdError **errp);

/* ---- qcow2.c ---- */
/* Preallocate [from, to) and grow the file to the image end; lock held. */
int q2_preallocate_locked(Qcow2State *s, uint64_t from, uint64_t to, VdPrealloc mode);
/* Before the first modification of an open: clear autoclear bits, set the lazy dirty bit. */
int q2_first_write(Qcow2State *s);
/*
 * Amend's close and open of the driver state on the same node: close writes every cache and
 * clears the dirty bit; open reads the file again with bs->open_flags. A failed open leaves a
 * damaged state that fails every request and that close accepts.
 */
void q2_close_state(BlockNode *bs);
int q2_open_state(BlockNode *bs, VdError **errp);

/* ---- qcow2-amend.c: qemu-img amend (vtable) ---- */
int q2_amend(BlockNode *bs, const VdAmendOptions *o, VdError **errp);

/* ---- qcow2-snapshot.c: internal snapshots (vtable entries; they take s->lock) ---- */
json_t *q2_get_snapshots(BlockNode *bs);
int q2_snapshot_create(BlockNode *bs, const char *name, VdError **errp);
int q2_snapshot_goto(BlockNode *bs, const char *id_or_name, VdError **errp);
int q2_snapshot_delete(BlockNode *bs, const char *id, const char *name, VdError **errp);
/* At open (read-only): make the snapshot's L1 and size the ones this node serves. */
int q2_snapshot_load(Qcow2State *s, const char *id_or_name, VdError **errp);
/*
 * Set header extension `type` to data (len bytes; data NULL = remove it) and the autoclear
 * features, rewrite the header cluster and flush. Lock held.
 */
int q2_update_header_ext(Qcow2State *s, uint32_t type, const uint8_t *data, uint32_t len,
                         uint64_t autoclear);

/* ---- qcow2-bitmap.c: the bitmaps extension (vtable hooks, block.h) ---- */
bool q2_bitmaps_supported(BlockNode *bs);
int q2_bitmaps_load(BlockNode *bs, VdStoredBitmap **list, size_t *n, VdError **errp);
int q2_bitmaps_store(BlockNode *bs, const VdStoredBitmap *list, size_t n, VdError **errp);
int q2_bitmaps_can_store(BlockNode *bs, const char *name, uint32_t granularity_bits,
                         VdError **errp);
int q2_bitmaps_remove(BlockNode *bs, const char *name, VdError **errp);
/* qemu-img info's "bitmaps" list, read from the image; NULL when none. Lock held. */
json_t *q2_bitmaps_info(Qcow2State *s);

/* qcow2_check_file / qcow2_measure: formats/qcow2-check.h */

#endif
