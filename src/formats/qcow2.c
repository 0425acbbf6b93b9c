/*
 * qcow2.c - the qcow2 format driver (vd_drv_qcow2): open/close (header parsing in qcow2-header.c,
 * create in qcow2-create.c), I/O entry points, truncate, backing-file change, info, check, vtable.
 *
 * Locking: one pthread mutex per image (s->lock) is held for each whole request, with two
 * exceptions. Compressed writes compress each cluster without the lock and take it per cluster
 * for allocation, data write and L2 update only (so convert -c compresses in parallel).
 * Lockless data I/O: pread of NORMAL clusters and pwrite that overwrites allocated clusters in
 * place (COPIED, not compressed, no zero flag, all subclusters allocated: no allocation, no COW,
 * the mapping stays) look the mapping up under the lock, count themselves in
 * s->lockless_inflight, drop the lock for the data pread/pwrite, then re-take it and uncount.
 * Invariants that make this safe without any range serialization by the caller:
 *  - a host cluster is freed or repurposed (refcount decrement, discard, unmapping zero-write,
 *    COW release of shared/compressed clusters, truncate, check/repair) only while
 *    lockless_inflight == 0 and s->lock is held: those requests call q2_lockless_wait_idle()
 *    at their start, before changing anything, and keep the lock to the end; the deferred COW
 *    frees are applied only when nothing is in flight (else the list grows and the next write /
 *    flush applies it after waiting). New lockless I/O maps through the current L2 entries,
 *    which no longer point at a cluster whose reference was dropped, so the allocator never
 *    hands out a cluster a lockless I/O is still using.
 *  - while a thread waits for idle (lockless_waiters > 0) new data I/O is done under the lock,
 *    so the wait ends.
 *  - allocating writes (qcow2_pwrite) map, read copy-on-write data that is not the backing
 *    file's, allocate and later set their L2 entries under the lock, but write the data (and read
 *    copy-on-write data from the backing file) without it, counted in lockless_inflight and
 *    registered in s->allocs: another allocating write of the same guest clusters waits on
 *    alloc_done and redoes its step on the new mapping, so two writers never both allocate one
 *    guest cluster. Data is written before its L2 entry, as before.
 *  - extended L2: a write covering a cluster in part allocates only the subclusters it touches
 *    (write_subclusters: the same `me` registration and lockless data write, then the bits are
 *    merged into the entry's current bitmap); write-zeroes sets zero bits per whole subcluster.
 *  - compressed writes, zero writes and other reads stay under the lock;
 *    metadata-only frees (old L2 / L1 / refcount tables) need no wait: data I/O never maps there.
 *  - data_dirty is set before and after a lockless write, so the next flush syncs the file.
 *  - getlength reads s->size_pub atomically (no lock); it is updated under the lock wherever
 *    h.size changes (open, truncate, check reload).
 *
 * Metadata ordering (crash safety; after kill -9 `qemu-img check` shows at most leaks):
 *  - allocating: the refcount increment is made in the refcount-block cache and the L2 cache is
 *    made to depend on it; guest data is written to the new cluster; the L2 entry is updated in
 *    the L2 cache. Before any dirty L2 table is written, the refcount cache is written and the file
 *    flushed (and the file is flushed if data was written since the last flush). So on disk:
 *    data and refcount before L2 entry.
 *  - new L2 tables, refcount blocks, L1 and refcount tables are written and flushed, with their
 *    own refcounts already durable, before the L1 entry / refcount-table entry / header field that
 *    points at them is written.
 *  - freeing: the entry (L2 or L1) that dropped the reference is updated first; the refcount
 *    cache is made to depend on the L2 cache, so the decrement is written only after the L2
 *    tables and a flush. Conflicting dependencies are settled by flushing eagerly. Clusters
 *    replaced by copy-on-write are released in batches (at flush, or every 512), so overwriting
 *    shared or compressed data does not flush per cluster; a crash before that only leaks.
 *  - .flush applies batched frees, writes the L2 cache (after its dependency), then the
 *    refcount cache, then flushes the file.
 *  - lazy refcounts (compat bit, read-write): the first write sets the dirty bit and flushes it;
 *    then refcount increments are not ordered before L2 entries / new L2 tables (they are
 *    written at flush, close or eviction). A clean close flushes everything, then clears the
 *    bit. A dirty image opened read-write is repaired with qcow2_check_file() first, then the
 *    bit is cleared (that is the crash recovery of lazy refcounts).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "formats/qcow2-check.h"
#include "formats/qcow2.h"
#include "util/lock.h"
static void q2_free_state(Qcow2State *s)
{
    q2_cache_destroy(&s->l2_cache);
    q2_cache_destroy(&s->rb_cache);
    free(s->l1);
    s->l1 = NULL;
    free(s->reftable);
    s->reftable = NULL;
    free(s->hdr_raw);
    s->hdr_raw = NULL;
    free(s->pending_frees);
    s->pending_frees = NULL;
    s->nb_pending_frees = 0;
    s->cap_pending_frees = 0;
    q2_free_exts(s);
    vd_crypt_close(&s->crypt);
    free(s->data_file_name);
    s->data_file_name = NULL;
    free(s->backing_file);
    s->backing_file = NULL;
    free(s->backing_fmt);
    s->backing_fmt = NULL;
}

static int load_l1(Qcow2State *s, VdError **errp)
{
    free(s->l1);
    s->l1 = calloc(s->l1_size ? s->l1_size : 1, sizeof(uint64_t));
    if (!s->l1) {
        vd_error_setg(errp, ENOMEM, "qcow2: cannot allocate the L1 table");
        return -ENOMEM;
    }
    if (!s->l1_size) {
        return 0;
    }
    uint8_t *raw = malloc((size_t)s->l1_size * 8);
    if (!raw) {
        vd_error_setg(errp, ENOMEM, "qcow2: cannot allocate the L1 table");
        return -ENOMEM;
    }
    int ret = vd_pread(s->bs->file, s->l1_offset, (uint64_t)s->l1_size * 8, raw);
    if (ret < 0) {
        free(raw);
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the L1 table");
        return ret;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        s->l1[i] = qcow2_be64(raw + 8 * i);
    }
    free(raw);
    return 0;
}

static int init_caches(Qcow2State *s, VdError **errp)
{
    uint64_t cs = s->cluster_size;
    uint64_t per_l2 = cs * s->l2_entries;
    uint64_t tables = (s->h.size + per_l2 - 1) / per_l2;
    uint64_t maxe = Q2_L2_CACHE_MAX_BYTES / cs;
    uint64_t l2e = tables + 2;
    if (l2e > maxe) {
        l2e = maxe;
    }
    if (l2e < 8) {
        l2e = 8;
    }
    uint64_t rbe_cov = (1ULL << s->rb_bits) * cs;
    uint64_t rbs = (s->h.size + rbe_cov - 1) / rbe_cov + 4;
    uint64_t rmax = (8ULL << 20) / cs;
    if (rbs > rmax) {
        rbs = rmax;
    }
    if (rbs < Q2_RB_CACHE_MIN_ENTRIES) {
        rbs = cs >= (1ULL << 20) ? 8 : Q2_RB_CACHE_MIN_ENTRIES;
    }
    if (q2_cache_init(&s->l2_cache, (int)l2e, cs, true) < 0 ||
        q2_cache_init(&s->rb_cache, (int)rbs, cs, false) < 0) {
        vd_error_setg(errp, ENOMEM, "qcow2: cannot allocate metadata caches");
        return -ENOMEM;
    }
    return 0;
}

/* The LUKS header's bytes, inside the clusters the crypto header extension names. */
static int crypto_hdr_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    Qcow2State *s = opaque;
    if (offset > s->crypto_len || len > s->crypto_len - offset) {
        return -EINVAL;
    }
    return vd_pread(s->bs->file, s->crypto_off + offset, len, buf);
}

/*
 * The external data file: the node the caller opened (json:/blockdev-add "data-file"), else the
 * name the image records, resolved against the image's directory as a backing file name is
 * (QEMU 7.2 resolves it against the working directory: a deliberate difference, README).
 * A metadata-only open (info) goes on without it, as qemu-img info does.
 */
static int open_data_file(BlockNode *bs, Qcow2State *s, BlockNode *given, int flags,
                          VdError **errp)
{
    if (given) {
        if ((flags & VD_OPEN_RDWR) && given->read_only) {
            vd_error_setg(errp, EACCES, "qcow2: the data file node '%s' is read-only",
                          given->node_name);
            return -EACCES;
        }
        vd_node_ref(given);
        bs->data_file = given;
        return 0;
    }
    if (!s->data_file_name) {
        if (flags & VD_OPEN_NO_IO) {
            return 0;
        }
        vd_error_setg(errp, EINVAL, "'data-file' is required for this image");
        return -EINVAL;
    }
    char *full = vd_filename_is_uri(s->data_file_name)
                     ? strdup(s->data_file_name)
                     : vd_resolve_backing_path(bs->filename, s->data_file_name);
    if (!full) {
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    VdError *local = NULL;
    int pflags = flags & (VD_OPEN_RDWR | VD_OPEN_DIRECT | VD_OPEN_FORCE_SHARE | VD_OPEN_NO_FLUSH);
    bs->data_file = vd_open_protocol(full, pflags, &local);
    free(full);
    if (!bs->data_file) {
        if (flags & VD_OPEN_NO_IO) {
            vd_error_free(local);
            return 0;
        }
        int code = vd_error_code(local);
        vd_error_propagate(errp, local); /* "Could not open 'NAME': ...", as QEMU says it */
        return code ? -code : -EIO;
    }
    return 0;
}

static int qcow2_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    int flags = opts ? opts->flags : bs->open_flags;
    bool rw = (flags & VD_OPEN_RDWR) != 0;
    int ret;
    bool repaired = false;

    memset(s, 0, sizeof(*s));
    s->bs = bs;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->lockless_idle, NULL);
    pthread_cond_init(&s->alloc_done, NULL);
    if (!bs->file) {
        vd_error_setg(errp, EINVAL, "qcow2: '%s' has no file child", bs->filename);
        return -EINVAL;
    }
again:
    ret = q2_parse_header(bs, s, flags, errp);
    if (ret < 0) {
        goto fail;
    }
    if ((s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) && rw && !(flags & VD_OPEN_CHECK)) {
        if (repaired) {
            vd_error_setg(errp, EIO, "qcow2: could not clear the dirty bit");
            ret = -EIO;
            goto fail;
        }
        /* refcounts may be stale (lazy refcounts): repair before trusting them */
        VdCheckResult res;
        memset(&res, 0, sizeof(res));
        ret = qcow2_check_file(bs->file, &res, VD_FIX_LEAKS | VD_FIX_ERRORS | QCOW2_CHECK_QUIET,
                               errp);
        free(res.filename);
        if (ret < 0) {
            vd_error_prepend(errp, "qcow2: repairing the dirty image failed: ");
            goto fail;
        }
        uint8_t be[8];
        qcow2_put_be64(be, s->h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY);
        ret = vd_pwrite(bs->file, 72, 8, be, 0);
        if (ret == 0) {
            ret = vd_flush(bs->file);
        }
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not clear the dirty bit");
            goto fail;
        }
        repaired = true;
        goto again;
    }
    if (!s->damaged) {
        ret = load_l1(s, errp);
        if (ret == 0) {
            ret = q2_load_reftable(s, errp);
        }
    }
    if (ret == 0) {
        ret = init_caches(s, errp);
    }
    if (ret < 0) {
        goto fail;
    }
    if (opts && opts->data_file && !s->has_data_file) {
        vd_error_setg(errp, EINVAL, "'data-file' can only be set for images with an external "
                      "data file");
        ret = -EINVAL;
        goto fail;
    }
    if (s->has_data_file && !bs->data_file &&
        (ret = open_data_file(bs, s, opts ? opts->data_file : NULL, flags, errp)) < 0) {
        goto fail;
    }
    if (s->h.crypt_method == QCOW2_CRYPT_LUKS) {
        /* amend reopens without options: metadata only, as qemu-img amend needs no key */
        ret = vd_crypt_open(&s->crypt, crypto_hdr_read, s, opts ? opts->key_secret : NULL,
                            !opts || (flags & VD_OPEN_NO_IO), "encrypt.key-secret", errp);
        if (ret < 0) {
            goto fail;
        }
        bs->encrypted = true;
    }
    s->read_only = !rw;
    s->metadata_prealloc = -1;
    q2_publish_size(s);
    if (opts && opts->snapshot && (ret = q2_snapshot_load(s, opts->snapshot, errp)) < 0) {
        goto fail;
    }
    s->lazy_refcounts = rw && s->h.version >= 3 &&
                        (s->h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS);
    s->set_dirty = false;
    free(bs->backing_file);
    bs->backing_file = NULL;
    free(bs->backing_format);
    bs->backing_format = NULL;
    if (s->backing_file && !(bs->backing_file = strdup(s->backing_file))) {
        ret = -ENOMEM;
        goto fail;
    }
    if (s->backing_fmt && !(bs->backing_format = strdup(s->backing_fmt))) {
        ret = -ENOMEM;
        goto fail;
    }
    return 0;
fail:
    q2_free_state(s);
    pthread_cond_destroy(&s->lockless_idle);
    pthread_cond_destroy(&s->alloc_done);
    pthread_mutex_destroy(&s->lock);
    return ret;
}

static int clear_dirty(Qcow2State *s);

static void qcow2_close(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* none by contract (no request runs across close) */
    if (!s->read_only && !s->damaged) {
        /* a failed flush keeps the dirty bit: the next open repairs what did not reach disk */
        if (q2_flush_all(s) == 0) {
            clear_dirty(s);
        }
    }
    q2_free_state(s);
    vd_mutex_unlock(&s->lock);
    pthread_cond_destroy(&s->lockless_idle);
    pthread_cond_destroy(&s->alloc_done);
    pthread_mutex_destroy(&s->lock);
}

/* Amend's close: the data file node stays (bs->data_file) for its q2_open_state. */
void q2_close_state(BlockNode *bs)
{
    qcow2_close(bs);
}

int q2_open_state(BlockNode *bs, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    bool bitmaps_loaded = s->bitmaps_loaded;
    int ret = qcow2_open(bs, NULL, errp); /* bs->data_file is still open */
    if (ret < 0) {
        /* a state close can take: every request fails with -EIO, close writes nothing */
        memset(s, 0, sizeof(*s));
        s->bs = bs;
        pthread_mutex_init(&s->lock, NULL);
        pthread_cond_init(&s->lockless_idle, NULL);
        pthread_cond_init(&s->alloc_done, NULL);
        s->damaged = true;
        s->read_only = true;
        return ret;
    }
    s->bitmaps_loaded = bitmaps_loaded; /* the bitmaps stay in the dirty-bitmap module's hands */
    return 0;
}

/*
 * Any file with the qcow magic is claimed, whatever its version: QEMU probes version 1 as qcow
 * and >= 2 as qcow2, and then fails to open what it does not support. Probing such a file as
 * raw instead would expose its metadata as guest data (and let writes destroy it), so the open
 * refuses it with "Unsupported qcow2 version N" / the qcow (v1) message.
 */
static int qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
    if (len >= 8 && qcow2_be32(buf) == QCOW2_MAGIC) {
        return 100;
    }
    return 0;
}

/*
 * Before the first modification: autoclear features we do not maintain are cleared, telling
 * other programs those structures are stale (per spec); the bitmaps bit stays when qcow2-bitmap.c
 * holds the bitmaps (they are in use on disk and stored at close). With lazy refcounts, the
 * dirty bit is set and flushed before any refcount update is deferred.
 */
int q2_first_write(Qcow2State *s)
{
    int ret;
    uint64_t keep = (s->bitmaps_loaded ? QCOW2_AUTOCLEAR_BITMAPS : 0) |
                    (s->data_file_raw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0);
    if (s->h.version >= 3 && (s->h.autoclear_features & ~keep)) {
        uint8_t be[8];
        qcow2_put_be64(be, s->h.autoclear_features & keep);
        ret = vd_pwrite(s->bs->file, 88, 8, be, 0);
        if (ret == 0) {
            ret = q2_file_flush(s);
        }
        if (ret < 0) {
            return ret;
        }
        s->h.autoclear_features &= keep;
    }
    if (s->lazy_refcounts && !(s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        uint8_t be[8];
        qcow2_put_be64(be, s->h.incompatible_features | QCOW2_INCOMPAT_DIRTY);
        ret = vd_pwrite(s->bs->file, 72, 8, be, 0);
        if (ret == 0) {
            ret = q2_file_flush(s);
        }
        if (ret < 0) {
            return ret;
        }
        s->h.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
        s->set_dirty = true;
    }
    return 0;
}

/*
 * Clean close (or the end of a lazy period): with every cache written and flushed, the refcounts
 * on disk are exact again, so the dirty bit this open set can go. Lock held.
 */
static int clear_dirty(Qcow2State *s)
{
    if (!s->set_dirty || !(s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        return 0;
    }
    int ret = q2_flush_all(s);
    if (ret < 0) {
        return ret;
    }
    uint8_t be[8];
    qcow2_put_be64(be, s->h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY);
    ret = vd_pwrite(s->bs->file, 72, 8, be, 0);
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret == 0) {
        s->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
        s->set_dirty = false;
    }
    return ret;
}

/*
 * ---- I/O entry points: each holds s->lock for the whole request, except lockless data I/O;
 * those that may free or repurpose host clusters first wait for it to drain ----
 */

static int qcow2_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    Qcow2State *s = q2_state(bs);
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    int ret = q2_read_unlocked_data(s, offset, bytes, buf);
    vd_mutex_unlock(&s->lock);
    return ret;
}

static int qcow2_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        return -EROFS;
    }
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    int ret = q2_first_write(s);
    if (ret == 0 && s->nb_pending_frees >= Q2_MAX_PENDING_FREES) {
        /* frees deferred while lockless I/O was in flight: apply them now that it is safe */
        q2_lockless_wait_idle(s);
        ret = q2_apply_pending_frees(s);
    }
    if (ret == 0) {
        ret = q2_write_unlocked_data(s, offset, bytes, buf);
    }
    if (ret == 0 && (flags & VD_REQ_FUA)) {
        q2_lockless_wait_idle(s); /* q2_flush_all applies deferred frees */
        ret = q2_flush_all(s);
    }
    vd_mutex_unlock(&s->lock);
    return ret;
}

/*
 * Zero writes and discards may unmap or free clusters: they wait for lockless data I/O to drain
 * and keep the lock to the end (see "Locking" above).
 */
static int modify_mapping(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags,
                          int (*op)(Qcow2State *, uint64_t, uint64_t, int))
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        return -EROFS;
    }
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s);
    int ret = q2_first_write(s);
    if (ret == 0) {
        ret = op(s, offset, bytes, flags);
    }
    if (ret == 0 && (flags & VD_REQ_FUA)) {
        ret = q2_flush_all(s);
    }
    vd_mutex_unlock(&s->lock);
    return ret;
}

static int qcow2_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    return modify_mapping(bs, offset, bytes, flags, q2_zero);
}

static int qcow2_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    /* As before: a discard ignores FUA here (the NBD server flushes the node for FUA itself). */
    return modify_mapping(bs, offset, bytes, flags & ~VD_REQ_FUA, q2_discard);
}

static int qcow2_pwrite_compressed(BlockNode *bs, uint64_t offset, uint64_t bytes,
                                   const void *buf)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        return -EROFS;
    }
    if (s->crypt.luks || s->has_data_file) {
        return -ENOTSUP; /* QEMU: compression excludes encryption and external data files */
    }
    if (s->damaged) {
        return -EIO;
    }
    if (offset & (s->cluster_size - 1)) {
        return -EINVAL;
    }
    uint8_t *in = malloc(s->cluster_size);
    uint8_t *out = malloc(s->cluster_size);
    if (!in || !out) {
        free(in);
        free(out);
        return -ENOMEM;
    }
    /*
     * Compression (the costly part) runs without s->lock, so convert -c's worker threads
     * compress in parallel; the lock covers only allocation, the data write and the L2 update.
     */
    const uint8_t *p = buf;
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        uint64_t n = bytes < s->cluster_size ? bytes : s->cluster_size;
        int clen = q2_compress_cluster(s, offset, n, p, in, out);
        if (clen < 0) {
            ret = clen;
            break;
        }
        vd_mutex_lock(&s->lock);
        q2_lockless_wait_idle(s); /* replaces (frees) the old cluster */
        ret = q2_first_write(s);
        if (ret == 0) {
            ret = q2_write_compressed_cluster(s, offset, n, p, out, clen);
        }
        vd_mutex_unlock(&s->lock);
        offset += n;
        bytes -= n;
        p += n;
    }
    free(in);
    free(out);
    return ret;
}

/*
 * Before a flush takes the lock: sync the guest data written so far WITHOUT the lock. Writing
 * back a dirty L2 table needs the data it points at (and the refcounts of its new clusters)
 * durable first, and that sync, made under the lock, covered everything written since the last
 * one (after a stream or a mirror, hundreds of MiB: measured 0.3-0.6 s with every allocating
 * guest write waiting for the lock). So each pass writes the dirty refcount blocks (pwrites only,
 * under the lock) and syncs the file without it; if nothing was written meanwhile (data_gen and
 * the refcount cache's dirtied unchanged), data_dirty and the L2 cache's dependency are settled
 * and the write-back under the lock makes no sync before its L2 writes (the same number of syncs
 * as before, one of them moved out of the lock). Under a busy writer the next pass syncs only what
 * was written during the previous one (at most Q2_PRESYNC_PASSES, another only while one took
 * over 25 ms: a backlog whose sync under the lock would stall guests), so the sync left under
 * the lock is short, while a flush-heavy guest with little written between flushes pays no extra
 * sync.
 */
#define Q2_PRESYNC_PASSES 3
static int presync_data(BlockNode *bs, Qcow2State *s)
{
    if (bs->open_flags & VD_OPEN_NO_FLUSH) {
        return 0;
    }
    for (int pass = 0; pass < Q2_PRESYNC_PASSES; pass++) {
        vd_mutex_lock(&s->lock);
        bool dirty = s->data_dirty;
        uint64_t gen = s->data_gen;
        /* refcounts first only when they depend on nothing (else the lock's write-back orders) */
        bool rb = s->l2_cache.depends == &s->rb_cache && !s->rb_cache.depends;
        int ret = rb ? q2_cache_flush(s, &s->rb_cache) : 0;
        uint64_t rgen = s->rb_cache.dirtied;
        vd_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
        if (!dirty && !rb) {
            return 0;
        }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        /* the data file holds the data; the image file the refcounts written above */
        ret = s->has_data_file && dirty ? vd_flush(q2_data_node(s)) : 0;
        if (ret == 0 && (!s->has_data_file || rb)) {
            ret = vd_flush(bs->file);
        }
        if (ret < 0) {
            return ret;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        vd_mutex_lock(&s->lock);
        /* a write in flight during the sync bumps data_gen when it ends (lockless ones too) */
        if (s->data_gen == gen) {
            s->data_dirty = false; /* everything written before the sync began is durable */
        }
        if (rb && s->rb_cache.dirtied == rgen && s->l2_cache.depends == &s->rb_cache) {
            s->l2_cache.depends = NULL; /* the refcounts written above are durable */
        }
        vd_mutex_unlock(&s->lock);
        int64_t ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms < 25) {
            break;
        }
    }
    return 0;
}

static int qcow2_flush(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    bool may_sync = !(bs->open_flags & VD_OPEN_NO_FLUSH);
    if (s->read_only || s->damaged) {
        return may_sync ? vd_flush(bs->file) : 0; /* flush_syncs_file: the file is ours to sync */
    }
    if (s->has_data_file && !bs->data_file) {
        return -EIO;
    }
    int ret = presync_data(bs, s);
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* q2_writeback_all applies deferred frees */
    if (ret == 0) {
        ret = q2_writeback_all(s);
    }
    vd_mutex_unlock(&s->lock);
    /*
     * The file's own flush (an fdatasync: milliseconds to seconds) runs without the image lock,
     * as QEMU's qcow2 flushes to the OS under its lock and the file after it: guest writes and
     * allocations go on meanwhile instead of stalling behind the sync. Everything written before
     * this flush was called is in the file already, so this sync makes it durable; later writes
     * order themselves (they set their own dependencies and data_dirty).
     */
    if (ret == 0 && may_sync) {
        ret = vd_flush(bs->file);
    }
    if (ret == 0 && may_sync && s->has_data_file) {
        ret = vd_flush(bs->data_file); /* a FUA write's data may still be only there */
    }
    return ret;
}

/*
 * Does the image look metadata-preallocated? As QEMU: count clusters with a non-zero refcount
 * up to the end of the file; if that reaches max(stored * 10 / 9, stored + 2), where stored is
 * the number of clusters the host file really stores, many referenced clusters are holes.
 * Returns 1 / 0, or -errno. Lock held.
 */
static int detect_metadata_prealloc(Qcow2State *s)
{
    BlockNode *file = s->bs->file;
    int64_t flen = vd_getlength(file);
    if (flen < 0) {
        return (int)flen;
    }
    if (!file->drv->allocated_size) {
        return 0;
    }
    int64_t real = file->drv->allocated_size(file);
    if (real < 0) {
        return 0; /* unknown (e.g. NBD): no recursion, as QEMU when it cannot tell */
    }
    uint64_t real_clusters = (uint64_t)real / s->cluster_size;
    uint64_t threshold = real_clusters * 10 / 9;
    if (threshold < real_clusters + 2) {
        threshold = real_clusters + 2;
    }
    uint64_t end = ((uint64_t)flen + s->cluster_size - 1) >> s->cluster_bits;
    uint64_t count = 0;
    for (uint64_t i = 0; i < end && count < threshold; i++) {
        uint64_t rc;
        int ret = q2_get_refcount(s, i, &rc);
        if (ret < 0) {
            return ret;
        }
        count += rc != 0;
    }
    return count >= threshold;
}

static int qcow2_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                              uint64_t *map, BlockNode **file)
{
    Qcow2State *s = q2_state(bs);
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    uint64_t m = 0;
    if (s->metadata_prealloc < 0) {
        /* data file clusters have no refcounts to count: never the heuristic (as QEMU) */
        int r = s->has_data_file ? 0 : detect_metadata_prealloc(s);
        s->metadata_prealloc = r > 0; /* an error only costs the extra zero information */
    }
    int ret = q2_block_status(s, offset, bytes, pnum, &m);
    if (ret >= 0 && s->metadata_prealloc && (ret & VD_BS_DATA) && !(ret & VD_BS_ZERO) &&
        (ret & VD_BS_OFFSET_VALID)) {
        ret |= VD_BS_RECURSE; /* preallocated clusters may be file holes: ask the file */
    }
    vd_mutex_unlock(&s->lock);
    if (ret >= 0 && s->crypt.luks) {
        ret &= ~(VD_BS_OFFSET_VALID | VD_BS_RECURSE); /* ciphertext: no host offset (QEMU) */
    }
    if (ret >= 0 && (ret & VD_BS_OFFSET_VALID)) {
        if (map) {
            *map = m;
        }
        if (file) {
            *file = q2_data_node(s);
        }
    }
    return ret;
}

/* Called twice per NBD request: no lock, size_pub mirrors h.size (updated under the lock). */
static int64_t qcow2_getlength(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    return (int64_t)__atomic_load_n(&s->size_pub, __ATOMIC_ACQUIRE);
}

static uint32_t qcow2_cluster_size(BlockNode *bs)
{
    return (uint32_t)q2_state(bs)->cluster_size;
}

/* ---- truncate ---- */

static int update_size_field(Qcow2State *s, uint64_t size)
{
    uint8_t be[8];
    qcow2_put_be64(be, size);
    int ret = q2_write_header_field(s, 24, be, 8);
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret == 0) {
        s->h.size = size;
        q2_publish_size(s);
    }
    return ret;
}

/* End of the last cluster with a non-zero refcount (an upper bound of the used file). */
static int image_end(Qcow2State *s, uint64_t *end)
{
    *end = 0;
    for (uint64_t ri = s->reftable_size; ri-- > 0;) {
        if (!s->reftable[ri]) {
            continue;
        }
        for (uint64_t i = 1ULL << s->rb_bits; i-- > 0;) {
            uint64_t rc;
            uint64_t ci = (ri << s->rb_bits) + i;
            int ret = q2_get_refcount(s, ci, &rc);
            if (ret < 0) {
                return ret;
            }
            if (rc) {
                *end = (ci + 1) << s->cluster_bits;
                return 0;
            }
        }
    }
    return 0;
}

int q2_preallocate_locked(Qcow2State *s, uint64_t from, uint64_t to, VdPrealloc mode)
{
    int ret = q2_preallocate(s, from, to, mode);
    if (ret < 0) {
        return ret;
    }
    ret = q2_flush_all(s);
    if (ret < 0) {
        return ret;
    }
    uint64_t end;
    ret = image_end(s, &end);
    if (ret < 0) {
        return ret;
    }
    int64_t flen = vd_getlength(s->bs->file);
    if (flen < 0) {
        return (int)flen;
    }
    if (end > (uint64_t)flen) {
        ret = vd_truncate(s->bs->file, end, false, VD_PREALLOC_OFF, NULL);
    }
    return ret;
}

static int qcow2_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                          VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    int ret = 0;
    if (s->read_only) {
        vd_error_setg(errp, EROFS, "qcow2: image is read-only");
        return -EROFS;
    }
    if (s->damaged) {
        vd_error_setg(errp, EIO, "qcow2: image is corrupt (a metadata table lies outside the "
                      "file); run 'check -r all'");
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* a shrink frees clusters */
    uint64_t old = s->h.size;
    uint64_t cs = s->cluster_size;
    uint64_t per_l1 = cs * s->l2_entries;
    if (size & 511) {
        vd_error_setg(errp, EINVAL, "The new size must be a multiple of 512");
        ret = -EINVAL;
        goto out;
    }
    if (prealloc != VD_PREALLOC_OFF && s->h.crypt_method) {
        /* preallocated clusters hold plaintext zeroes, which would read back as noise */
        vd_error_setg(errp, ENOTSUP, "Preallocation of encrypted images is not supported by "
                      "vdisk");
        ret = -ENOTSUP;
        goto out;
    }
    ret = q2_first_write(s);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not update the header");
        goto out;
    }
    if (size > (1ULL << 62)) {
        vd_error_setg(errp, EFBIG, "qcow2: size too large");
        ret = -EFBIG;
        goto out;
    }
    if (size == old) {
        /* a crafted size (1000) read as 512: QEMU writes the field even when it is the same */
        uint8_t be[8];
        ret = vd_pread(bs->file, 24, 8, be);
        if (ret == 0 && qcow2_be64(be) != size) {
            ret = update_size_field(s, size);
        }
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not update the header");
        }
        goto out;
    }
    if (size < old) {
        if (!shrink) {
            vd_error_setg(errp, EINVAL, "qcow2: use the shrink option to shrink an image");
            ret = -EINVAL;
            goto out;
        }
        if (s->h.nb_snapshots) {
            vd_error_setg(errp, ENOTSUP, "qcow2: cannot shrink an image with internal "
                          "snapshots");
            ret = -ENOTSUP;
            goto out;
        }
        if (prealloc != VD_PREALLOC_OFF) {
            vd_error_setg(errp, ENOTSUP, "qcow2: preallocation only applies when growing");
            ret = -ENOTSUP;
            goto out;
        }
        uint64_t a = (size + cs - 1) & ~(cs - 1);
        uint64_t b = (old + cs - 1) & ~(cs - 1);
        if (a < b) {
            ret = q2_discard(s, a, b - a, VD_REQ_FULL_DISCARD);
        }
        /* drop L2 tables wholly beyond the new end */
        uint64_t keep = (size + per_l1 - 1) / per_l1;
        for (uint64_t i = keep; ret == 0 && i < s->l1_size; i++) {
            uint64_t e = s->l1[i];
            if (!(e & QCOW2_L1E_OFFSET_MASK)) {
                continue;
            }
            uint8_t zero[8] = { 0 };
            ret = q2_cache_flush(s, &s->l2_cache);
            if (ret == 0) {
                ret = vd_pwrite(s->bs->file, s->l1_offset + i * 8, 8, zero, 0);
            }
            if (ret == 0) {
                s->l1[i] = 0;
                ret = q2_free_clusters(s, e & QCOW2_L1E_OFFSET_MASK, cs);
            }
        }
        if (ret == 0) {
            ret = q2_flush_all(s);
        }
        if (ret == 0) {
            ret = update_size_field(s, size);
        }
        if (ret == 0) {
            /* give back the file space past the last referenced cluster (as qemu-img) */
            uint64_t end;
            int64_t flen = vd_getlength(s->bs->file);
            ret = image_end(s, &end);
            if (ret == 0 && flen > 0 && end && end < (uint64_t)flen) {
                s->free_byte_offset = 0;
                ret = vd_truncate(s->bs->file, end, true, VD_PREALLOC_OFF, NULL);
            }
        }
        if (ret == 0 && s->has_data_file) {
            ret = bs->data_file ? vd_truncate(bs->data_file, size, true, VD_PREALLOC_OFF, NULL)
                               : -EIO; /* the data file follows the virtual size (QEMU) */
        }
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not shrink the image");
        }
        goto out;
    }
    if (s->has_data_file) {
        /* the data file grows with the image; a raw one is mapped 1:1 (metadata preallocation) */
        ret = bs->data_file ? vd_truncate(bs->data_file, size, false, VD_PREALLOC_OFF, errp)
                            : -EIO;
        if (ret < 0) {
            if (!bs->data_file) {
                vd_error_setg(errp, EIO, "qcow2: the data file is not open");
            }
            goto out;
        }
        if (s->data_file_raw && prealloc == VD_PREALLOC_OFF) {
            prealloc = VD_PREALLOC_METADATA;
        }
    }
    uint64_t need = (size + per_l1 - 1) / per_l1;
    ret = q2_grow_l1(s, need);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not grow the L1 table");
        goto out;
    }
    ret = q2_flush_all(s);
    if (ret == 0) {
        ret = update_size_field(s, size);
    }
    if (ret == 0 && (old & (cs - 1))) {
        /* whatever an earlier shrink left in the old last cluster must read as zeroes */
        uint64_t tail_end = (old + cs - 1) & ~(cs - 1);
        if (tail_end > size) {
            tail_end = size;
        }
        ret = q2_zero(s, old, tail_end - old, 0);
    }
    if (ret == 0 && prealloc != VD_PREALLOC_OFF) {
        ret = q2_preallocate_locked(s, old, size, prealloc);
    }
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not resize the image");
    }
out:
    vd_mutex_unlock(&s->lock);
    return ret;
}

/* ---- backing file ---- */

static int qcow2_change_backing_file(BlockNode *bs, const char *backing_file,
                                     const char *backing_fmt, int flags, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        vd_error_setg(errp, EROFS, "qcow2: image is read-only");
        return -EROFS;
    }
    if (s->damaged) {
        vd_error_setg(errp, EIO, "qcow2: image is corrupt (a metadata table lies outside the "
                      "file); run 'check -r all'");
        return -EIO;
    }
    if (backing_file && strlen(backing_file) > Q2_MAX_BACKING_NAME) {
        vd_error_setg(errp, EINVAL, "qcow2: backing file name too long");
        return -EINVAL;
    }
    vd_mutex_lock(&s->lock);
    char *of = s->backing_file, *ofmt = s->backing_fmt;
    char *nf = backing_file && *backing_file ? strdup(backing_file) : NULL;
    char *nfmt = nf && backing_fmt && *backing_fmt ? strdup(backing_fmt) : NULL;
    int ret;
    if ((backing_file && *backing_file && !nf) || (nf && backing_fmt && *backing_fmt && !nfmt)) {
        free(nf);
        free(nfmt);
        vd_mutex_unlock(&s->lock);
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    s->backing_file = nf;
    s->backing_fmt = nfmt;
    uint8_t *buf = malloc(s->cluster_size);
    if (buf && q2_first_write(s) < 0) {
        free(buf);
        buf = NULL;
    }
    ret = buf ? q2_build_header(s, buf) : -ENOMEM;
    if (ret < 0) {
        s->backing_file = of;
        s->backing_fmt = ofmt;
        free(nf);
        free(nfmt);
        free(buf);
        vd_mutex_unlock(&s->lock);
        if (ret == -ENOSPC) { /* ENOSPC as QEMU's: qemu-img words that case itself */
            vd_error_setg(errp, ENOSPC, "qcow2: the backing file name does not fit in the "
                          "header cluster");
            return -ENOSPC;
        }
        vd_error_setg_errno(errp, -ret, "qcow2: could not update the header");
        return ret;
    }
    free(of);
    free(ofmt);
    /*
     * Unsynced: no metadata the header names moves meanwhile (L1 and refcount table moves write
     * the header themselves), and what the new backing must not be read in place of is durable
     * (the caller's contract), so only the header is written; bs's next flush syncs it.
     */
    bool unsynced = flags & VD_BACKING_UNSYNCED;
    ret = 0;
    if (!unsynced) {
        q2_lockless_wait_idle(s); /* q2_flush_all applies deferred frees */
        ret = q2_flush_all(s);
    }
    if (ret == 0) {
        ret = vd_pwrite(bs->file, 0, s->cluster_size, buf, 0);
    }
    if (ret == 0 && !unsynced) {
        ret = q2_file_flush(s);
    }
    free(buf);
    vd_mutex_unlock(&s->lock);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not write the header");
    }
    return ret;
}

/* ---- info & check ---- */

static json_t *qcow2_get_specific_info(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    json_t *data = json_object();
    if (!data) {
        return NULL;
    }
    vd_mutex_lock(&s->lock);
    if (s->h.version >= 3) {
        json_object_set_new(data, "compat", json_string("1.1"));
        json_object_set_new(data, "compression-type",
                            json_string(s->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd"
                                                                                       : "zlib"));
        json_object_set_new(data, "lazy-refcounts",
                            json_boolean(s->h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS));
        json_t *bitmaps = q2_bitmaps_info(s);
        if (bitmaps) {
            json_object_set_new(data, "bitmaps", bitmaps);
        }
        json_object_set_new(data, "refcount-bits",
                            json_integer((json_int_t)1 << s->refcount_order));
        if (s->data_file_name) {
            json_object_set_new(data, "data-file", json_string(s->data_file_name));
        }
        if (s->has_data_file) {
            json_object_set_new(data, "data-file-raw", json_boolean(s->data_file_raw));
        }
        json_object_set_new(data, "corrupt",
                            json_boolean(s->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT));
        json_object_set_new(data, "extended-l2", json_boolean(s->extl2));
    } else {
        json_object_set_new(data, "compat", json_string("0.10"));
        json_object_set_new(data, "compression-type", json_string("zlib"));
        json_object_set_new(data, "refcount-bits",
                            json_integer((json_int_t)1 << s->refcount_order));
    }
    if (s->crypt.luks) {
        /* QCryptoBlockInfo: the LUKS members and the union's tag */
        json_t *enc = vd_luks_info(s->crypt.luks);
        json_object_set_new(enc, "format", json_string("luks"));
        json_object_set_new(data, "encrypt", enc);
    }
    vd_mutex_unlock(&s->lock);
    json_t *o = json_object();
    if (!o) {
        json_decref(data);
        return NULL;
    }
    json_object_set_new(o, "type", json_string("qcow2"));
    json_object_set_new(o, "data", data);
    return o;
}

static int qcow2_check(BlockNode *bs, VdCheckResult *res, int fix, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* a repair may free or reuse any cluster */
    int ret = 0;
    if (!s->read_only && !s->damaged) {
        ret = q2_flush_all(s);
        if (ret < 0) {
            vd_mutex_unlock(&s->lock);
            vd_error_setg_errno(errp, -ret, "qcow2: could not flush before check");
            return ret;
        }
    }
    ret = qcow2_check_file(bs->file, res, s->read_only ? fix & VD_CHECK_QUIET : fix, errp);
    fix &= VD_FIX_LEAKS | VD_FIX_ERRORS;
    if (!s->read_only && fix) {
        /*
         * A repair may clear the dirty / corrupt bits on disk even when it fixed nothing: take
         * them over, or a later lazy write would defer refcounts without the dirty bit set.
         */
        uint8_t be[8];
        if (s->h.version >= 3 && vd_pread(bs->file, 72, 8, be) == 0) {
            uint64_t disk = qcow2_be64(be);
            uint64_t bits = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT;
            s->h.incompatible_features = (s->h.incompatible_features & ~bits) | (disk & bits);
            if (!(disk & QCOW2_INCOMPAT_DIRTY)) {
                s->set_dirty = false;
            }
        }
    }
    if (!s->read_only && fix && (res->corruptions_fixed || res->leaks_fixed)) {
        /* the checker rewrote metadata on disk: reload it and forget cached tables */
        VdError *lerr = NULL;
        q2_cache_empty(s, &s->l2_cache, false);
        q2_cache_empty(s, &s->rb_cache, false);
        Qcow2Header keep = s->h;
        int r2 = q2_parse_header(bs, s, bs->open_flags | VD_OPEN_CHECK, &lerr);
        if (r2 == 0 && !s->damaged) {
            r2 = load_l1(s, &lerr);
        }
        if (r2 == 0 && !s->damaged) {
            r2 = q2_load_reftable(s, &lerr);
        }
        if (r2 < 0) {
            s->damaged = true; /* tables not (re)loaded: no I/O on them */
            s->h = keep;
            vd_error_propagate(errp, lerr);
            ret = ret < 0 ? ret : r2;
        }
        q2_publish_size(s);
        s->free_cluster_index = 0;
        s->free_byte_offset = 0;
        if (!(s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
            s->set_dirty = false; /* the repair cleared it; the next write sets it again */
        }
    }
    vd_mutex_unlock(&s->lock);
    return ret;
}


/*
 * qemu-img info's dirty-flag: the bit in the header on disk, which is what qemu-img reports too
 * (a read-only open does not repair the image). An unreadable header reads as clean.
 */
static int qcow2_is_dirty(BlockNode *bs, bool *dirty)
{
    uint8_t hdr[80];
    *dirty = bs->file && vd_pread(bs->file, 0, sizeof(hdr), hdr) == 0 &&
             qcow2_be32(hdr) == QCOW2_MAGIC && qcow2_be32(hdr + 4) >= 3 &&
             (qcow2_be64(hdr + 72) & QCOW2_INCOMPAT_DIRTY) != 0;
    return 0;
}

/* Qcow2OverlapCheckMode: overlap-check's string form (accepted; vdisk's checks are its own). */
static const char *const overlap_check_modes[] = {"none", "constant", "cached", "all", NULL};

/* BlockdevQcow2Encryption: a union on format (aes is refused by the QMP layer). */
static const char *const encrypt_formats[] = {"aes", "luks", NULL};
static const VdOptSpec qcow2_encrypt_options[] = {
    {"format", VD_OPT_ENUM, true, encrypt_formats},
    {"key-secret", VD_OPT_STR},
    {NULL}};

/* BlockdevOptionsQcow2. */
static const VdOptSpec qcow2_blockdev_options[] = {
    {"file", VD_OPT_REF, true},
    {"backing", VD_OPT_REF_NULL},
    {"lazy-refcounts", VD_OPT_BOOL},
    {"pass-discard-request", VD_OPT_BOOL},
    {"pass-discard-snapshot", VD_OPT_BOOL},
    {"pass-discard-other", VD_OPT_BOOL},
    {"overlap-check", VD_OPT_ALT, .enum_values = overlap_check_modes,
     .alt_name = "Qcow2OverlapChecks"},
    {"cache-size", VD_OPT_INT},
    {"l2-cache-size", VD_OPT_INT},
    {"l2-cache-entry-size", VD_OPT_INT},
    {"refcount-cache-size", VD_OPT_INT},
    {"cache-clean-interval", VD_OPT_INT},
    {"encrypt", VD_OPT_OBJ, .nested = qcow2_encrypt_options},
    {"data-file", VD_OPT_REF},
    {"snapshot", VD_OPT_STR}, /* vdisk: serve this internal snapshot (id or name), read-only */
    {NULL}};

const BlockDriver vd_drv_qcow2 = {
    .name = "qcow2",
    .is_protocol = false,
    .supports_backing = true,
    .blockdev_options = qcow2_blockdev_options,
    .state_size = sizeof(Qcow2State),
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .create = q2_create,
    .pread = qcow2_pread,
    .pwrite = qcow2_pwrite,
    .pwrite_zeroes = qcow2_pwrite_zeroes,
    .pdiscard = qcow2_pdiscard,
    .pwrite_compressed = qcow2_pwrite_compressed,
    .flush = qcow2_flush,
    .flush_syncs_file = true,
    .block_status = qcow2_block_status,
    .getlength = qcow2_getlength,
    .truncate = qcow2_truncate,
    .change_backing_file = qcow2_change_backing_file,
    .check = qcow2_check,
    .measure = qcow2_measure,
    .get_specific_info = qcow2_get_specific_info,
    .cluster_size = qcow2_cluster_size,
    .get_snapshots = q2_get_snapshots,
    .snapshot_create = q2_snapshot_create,
    .snapshot_goto = q2_snapshot_goto,
    .snapshot_delete = q2_snapshot_delete,
    .amend = q2_amend,
    .is_dirty = qcow2_is_dirty,
    .bitmaps_supported = q2_bitmaps_supported,
    .bitmaps_load = q2_bitmaps_load,
    .bitmaps_store = q2_bitmaps_store,
    .bitmaps_can_store = q2_bitmaps_can_store,
    .bitmaps_remove = q2_bitmaps_remove,
};
