/*
 * qcow2-cluster.c - qcow2 guest->host mapping (L1/L2, standard and extended entries) and the
 * data paths: read, write with copy-on-write, compressed read/write (zlib raw deflate, zstd),
 * block status and preallocation (write-zeroes and discard: qcow2-zero.c).
 *
 * Promises: a cluster is written in place only when its L2 entry has OFLAG_COPIED (refcount 1)
 * and it is fully allocated; otherwise the whole cluster gets new contents (partial writes merge
 * the old guest view: backing, zeroes, compressed or shared data) before the entry is switched,
 * and the old host cluster is released afterwards. L2 tables without OFLAG_COPIED in L1 are
 * copied before modification (snapshots stay intact). Runs under s->lock.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zlib.h>
#include <zstd.h>

#include "formats/qcow2.h"
#include "util/lock.h"

/* Cluster-level type (ignores extended-L2 bitmaps). */
Qcow2ClusterType q2_cluster_type(const Qcow2State *s, uint64_t e)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        return QCOW2_CLUSTER_COMPRESSED;
    }
    uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
    if (q2_has_zero_flag(s) && (e & QCOW2_OFLAG_ZERO)) {
        return off ? QCOW2_CLUSTER_ZERO_ALLOC : QCOW2_CLUSTER_ZERO_PLAIN;
    }
    return q2_l2e_has_host(s, e) ? QCOW2_CLUSTER_NORMAL : QCOW2_CLUSTER_UNALLOCATED;
}

/*
 * Type of subcluster sc of an entry; *host = host offset of the subcluster when *has (host offset
 * 0 is a real one in an external data file: guest cluster 0's). -EIO if invalid.
 */
static int subcluster_type(const Qcow2State *s, uint64_t e, uint64_t bm, unsigned sc,
                           Qcow2ClusterType *t, uint64_t *host, bool *has)
{
    uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
    *host = 0;
    *has = false;
    if (e & QCOW2_OFLAG_COMPRESSED) {
        *t = QCOW2_CLUSTER_COMPRESSED;
        return 0;
    }
    if (off & (s->cluster_size - 1)) {
        return -EIO; /* unaligned data cluster: corrupt image */
    }
    if (!s->extl2) {
        *t = q2_cluster_type(s, e);
        *has = *t == QCOW2_CLUSTER_NORMAL || *t == QCOW2_CLUSTER_ZERO_ALLOC;
        *host = off;
        return 0;
    }
    bool alloc = (bm >> sc) & 1;
    bool zero = (bm >> (32 + sc)) & 1;
    *has = q2_l2e_has_host(s, e);
    if (alloc && zero) {
        return -EIO;
    }
    if (zero) {
        *t = *has ? QCOW2_CLUSTER_ZERO_ALLOC : QCOW2_CLUSTER_ZERO_PLAIN;
    } else if (alloc) {
        if (!*has) {
            return -EIO;
        }
        *t = QCOW2_CLUSTER_NORMAL;
    } else {
        /* unallocated subcluster; a host cluster may exist (qemu reports its offset) */
        *t = QCOW2_CLUSTER_UNALLOCATED;
    }
    *host = *has ? off + (uint64_t)sc * s->sc_size : 0;
    return 0;
}

static int get_l2_ro(Qcow2State *s, uint64_t l1i, uint8_t **l2)
{
    *l2 = NULL;
    if (l1i >= s->l1_size) {
        return 0;
    }
    uint64_t off = s->l1[l1i] & QCOW2_L1E_OFFSET_MASK;
    if (!off) {
        return 0;
    }
    if (off & (s->cluster_size - 1)) {
        return -EIO;
    }
    return q2_cache_get(s, &s->l2_cache, off, l2);
}

/*
 * Describe the longest run starting at offset (<= bytes) whose (sub)clusters share one type
 * (and for NORMAL / ZERO_ALLOC, contiguous host offsets). Compressed clusters are merged only
 * when merge_compressed (block status); otherwise the run stops at the cluster's end.
 */
int q2_get_extent(Qcow2State *s, uint64_t offset, uint64_t bytes, bool merge_compressed,
                  Q2Extent *x)
{
    uint64_t cs = s->cluster_size;
    uint64_t pos = offset, end = offset + bytes;
    bool first = true, stop = false;
    int ret = 0;

    while (pos < end && !stop) {
        uint64_t l1i = pos >> (s->cluster_bits + s->l2_bits);
        uint8_t *l2;
        ret = get_l2_ro(s, l1i, &l2);
        if (ret < 0) {
            return ret;
        }
        if (!l2) {
            uint64_t tend = (l1i + 1) << (s->cluster_bits + s->l2_bits);
            if (first) {
                x->type = QCOW2_CLUSTER_UNALLOCATED;
                x->host = x->entry = 0;
                x->host_valid = false;
                first = false;
            } else if (x->type != QCOW2_CLUSTER_UNALLOCATED || x->host_valid) {
                break;
            }
            pos = tend < end ? tend : end;
            continue;
        }
        uint64_t idx = (pos >> s->cluster_bits) & (s->l2_entries - 1);
        for (; idx < s->l2_entries && pos < end && !stop; idx++) {
            uint64_t e = q2_l2e_get(s, l2, idx);
            uint64_t bm = q2_l2e_bitmap(s, l2, idx);
            uint64_t cstart = pos & ~(cs - 1);
            if (e & QCOW2_OFLAG_COMPRESSED) {
                if (first) {
                    x->type = QCOW2_CLUSTER_COMPRESSED;
                    x->entry = e;
                    x->host = 0;
                    x->host_valid = false;
                    first = false;
                } else if (x->type != QCOW2_CLUSTER_COMPRESSED || !merge_compressed) {
                    stop = true;
                    break;
                }
                uint64_t cend = cstart + cs;
                pos = cend < end ? cend : end;
                if (!merge_compressed) {
                    stop = true;
                }
                continue;
            }
            unsigned nsc = s->extl2 ? QCOW2_EXTL2_SUBCLUSTERS : 1;
            unsigned sc = (unsigned)((pos - cstart) / s->sc_size);
            for (; sc < nsc && pos < end; sc++) {
                Qcow2ClusterType t;
                uint64_t h;
                bool has;
                ret = subcluster_type(s, e, bm, sc, &t, &h, &has);
                if (ret < 0) {
                    q2_cache_put(&s->l2_cache, &l2);
                    return ret;
                }
                uint64_t scstart = cstart + (uint64_t)sc * s->sc_size;
                uint64_t hpos = has ? h + (pos - scstart) : 0;
                if (first) {
                    x->type = t;
                    x->host = hpos;
                    x->host_valid = has;
                    x->entry = e;
                    first = false;
                } else if (t != x->type || has != x->host_valid ||
                           (has && hpos != x->host + (pos - offset))) {
                    stop = true;
                    break;
                }
                uint64_t scend = scstart + s->sc_size;
                pos = scend < end ? scend : end;
            }
        }
        q2_cache_put(&s->l2_cache, &l2);
    }
    x->len = pos - offset;
    return 0;
}

static int read_backing(Qcow2State *s, uint64_t offset, uint64_t bytes, uint8_t *buf)
{
    BlockNode *b = s->bs->backing;
    if (!b) {
        memset(buf, 0, bytes);
        return 0;
    }
    int64_t blen = vd_getlength(b);
    if (blen < 0) {
        return (int)blen;
    }
    uint64_t avail = offset < (uint64_t)blen ? (uint64_t)blen - offset : 0;
    uint64_t n = avail < bytes ? avail : bytes;
    if (n) {
        int ret = vd_pread(b, offset, n, buf);
        if (ret < 0) {
            return ret;
        }
    }
    memset(buf + n, 0, bytes - n);
    return 0;
}

int q2_compress(Qcow2State *s, const uint8_t *src, uint8_t *dst, uint64_t dst_len)
{
    uint64_t cs = s->cluster_size;
    if (s->compression_type == QCOW2_COMPRESSION_ZSTD) {
        size_t r = ZSTD_compress(dst, dst_len, src, cs, ZSTD_CLEVEL_DEFAULT);
        if (ZSTD_isError(r)) {
            return -ENOSPC;
        }
        return (int)r;
    }
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)cs;
    z.next_out = dst;
    z.avail_out = (uInt)dst_len;
    int zr = deflate(&z, Z_FINISH);
    int len = (int)(dst_len - z.avail_out);
    deflateEnd(&z);
    return zr == Z_STREAM_END ? len : -ENOSPC;
}

int q2_decompress(Qcow2State *s, const uint8_t *src, uint64_t src_len, uint8_t *dst)
{
    uint64_t cs = s->cluster_size;
    if (s->compression_type == QCOW2_COMPRESSION_ZSTD) {
        ZSTD_DCtx *d = ZSTD_createDCtx();
        if (!d) {
            return -ENOMEM;
        }
        ZSTD_inBuffer in = { src, src_len, 0 };
        ZSTD_outBuffer out = { dst, cs, 0 };
        int ret = -EIO;
        for (;;) {
            size_t last_in = in.pos, last_out = out.pos;
            size_t r = ZSTD_decompressStream(d, &out, &in);
            if (ZSTD_isError(r)) {
                break;
            }
            if (out.pos == cs) {
                ret = 0;
                break;
            }
            if (r == 0 || (in.pos == last_in && out.pos == last_out)) {
                break; /* frame ended short, or no progress: corrupt */
            }
        }
        ZSTD_freeDCtx(d);
        return ret;
    }
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, -12) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)src_len;
    z.next_out = dst;
    z.avail_out = (uInt)cs;
    int zr = inflate(&z, Z_FINISH);
    bool ok = (zr == Z_STREAM_END || zr == Z_BUF_ERROR || zr == Z_OK) && z.avail_out == 0;
    inflateEnd(&z);
    return ok ? 0 : -EIO;
}

static int read_compressed_cluster(Qcow2State *s, uint64_t entry, uint8_t *out)
{
    uint64_t off, nb;
    qcow2_compressed_extent(entry, s->cluster_bits, &off, &nb);
    int64_t flen = vd_getlength(s->bs->file);
    if (flen < 0) {
        return (int)flen;
    }
    if (off >= (uint64_t)flen) {
        return -EIO;
    }
    if (off + nb > (uint64_t)flen) {
        nb = (uint64_t)flen - off; /* the last compressed cluster may end mid-sector */
    }
    uint8_t *in = malloc(nb);
    if (!in) {
        return -ENOMEM;
    }
    int ret = vd_pread(s->bs->file, off, nb, in);
    if (ret == 0) {
        ret = q2_decompress(s, in, nb, out);
    }
    free(in);
    return ret;
}

/* ---- lockless data I/O (see qcow2.c's header comment) ---- */

void q2_lockless_wait_idle(Qcow2State *s)
{
    if (s->lockless_inflight == 0) {
        return;
    }
    s->lockless_waiters++;
    while (s->lockless_inflight > 0) {
        vd_cond_wait(&s->lockless_idle, &s->lock);
    }
    s->lockless_waiters--;
}

/* Test hook (unit tests only): sleep this long inside each lockless window to widen races. */
unsigned q2_test_lockless_delay_us;

/*
 * Register one lockless data I/O and drop s->lock. Refused (the caller does the I/O under the
 * lock) while someone waits for idle, so a waiter is never starved by a stream of new requests.
 */
static bool lockless_begin(Qcow2State *s)
{
    if (s->lockless_waiters > 0) {
        return false;
    }
    s->lockless_inflight++;
    vd_mutex_unlock(&s->lock);
    unsigned d = __atomic_load_n(&q2_test_lockless_delay_us, __ATOMIC_RELAXED);
    if (d) {
        usleep(d);
    }
    return true;
}

static void lockless_end(Qcow2State *s)
{
    vd_mutex_lock(&s->lock);
    if (--s->lockless_inflight == 0 && s->lockless_waiters > 0) {
        vd_cond_broadcast(&s->lockless_idle);
    }
}

/*
 * Guest data at host offset host of the file: plain, or through the LUKS cipher. QEMU numbers
 * a LUKS-encrypted qcow2 sector by its host offset (crypt_physical_offset; only the legacy AES
 * format used guest offsets), so the IV follows the data when a cluster is rewritten elsewhere.
 */
static int data_pread(Qcow2State *s, uint64_t host, uint64_t n, uint8_t *buf)
{
    BlockNode *data = q2_data_node(s);
    if (!data) {
        return -EIO; /* metadata-only open without its data file */
    }
    return s->crypt.luks ? vd_crypt_pread(&s->crypt, data, host, host, n, buf)
                         : vd_pread(data, host, n, buf);
}

static int data_pwrite(Qcow2State *s, uint64_t host, uint64_t n, const uint8_t *buf)
{
    BlockNode *data = q2_data_node(s);
    if (!data) {
        return -EIO;
    }
    return s->crypt.luks ? vd_crypt_pwrite(&s->crypt, data, host, host, n, buf, 0)
                         : vd_pwrite(data, host, n, buf, 0);
}

static int read_impl(Qcow2State *s, uint64_t offset, uint64_t bytes, uint8_t *buf,
                     bool may_unlock)
{
    uint8_t *cbuf = NULL;
    int ret = 0;
    while (bytes > 0) {
        Q2Extent x;
        ret = q2_get_extent(s, offset, bytes, false, &x);
        if (ret < 0) {
            break;
        }
        switch (x.type) {
        case QCOW2_CLUSTER_NORMAL:
            /*
             * The mapping was read under the lock; the host clusters cannot be freed or reused
             * while the request is registered in lockless_inflight.
             */
            if (may_unlock && lockless_begin(s)) {
                ret = data_pread(s, x.host, x.len, buf);
                lockless_end(s);
            } else {
                ret = data_pread(s, x.host, x.len, buf);
            }
            break;
        case QCOW2_CLUSTER_ZERO_PLAIN:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            memset(buf, 0, x.len);
            break;
        case QCOW2_CLUSTER_UNALLOCATED:
            /*
             * The backing file's own locks order its I/O; holding ours across it made every
             * allocating write of this image wait for the backing's reads (and for whatever
             * holds the backing's lock: an active commit's copies into it). Registered in
             * lockless_inflight like a data read, so a backing-file change or a close waits.
             */
            if (may_unlock && lockless_begin(s)) {
                ret = read_backing(s, offset, x.len, buf);
                lockless_end(s);
            } else {
                ret = read_backing(s, offset, x.len, buf);
            }
            break;
        case QCOW2_CLUSTER_COMPRESSED:
            if (!cbuf && !(cbuf = malloc(s->cluster_size))) {
                ret = -ENOMEM;
                break;
            }
            ret = read_compressed_cluster(s, x.entry, cbuf);
            if (ret == 0) {
                memcpy(buf, cbuf + (offset & (s->cluster_size - 1)), x.len);
            }
            break;
        }
        if (ret < 0) {
            break;
        }
        offset += x.len;
        bytes -= x.len;
        buf += x.len;
    }
    free(cbuf);
    return ret;
}

int q2_read(Qcow2State *s, uint64_t offset, uint64_t bytes, uint8_t *buf)
{
    return read_impl(s, offset, bytes, buf, false);
}

int q2_read_unlocked_data(Qcow2State *s, uint64_t offset, uint64_t bytes, uint8_t *buf)
{
    return read_impl(s, offset, bytes, buf, true);
}

/* The guest view of a whole cluster (zero beyond the virtual size). */
static int read_guest_cluster(Qcow2State *s, uint64_t cstart, uint8_t *buf)
{
    uint64_t n = s->cluster_size;
    if (cstart >= s->h.size) {
        memset(buf, 0, n);
        return 0;
    }
    if (cstart + n > s->h.size) {
        n = s->h.size - cstart;
        memset(buf + n, 0, s->cluster_size - n);
    }
    return q2_read(s, cstart, n, buf);
}

/* Refuse to write guest data over the header, L1 table or refcount table. */
static int overlap_check(Qcow2State *s, uint64_t host, uint64_t len)
{
    if (s->has_data_file) {
        return 0; /* guest data never lands in the image file */
    }
    if (host < s->cluster_size) {
        return -EIO;
    }
    uint64_t l1end = s->l1_offset + (uint64_t)s->l1_size * 8;
    if (s->l1_size && host < l1end && host + len > s->l1_offset) {
        return -EIO;
    }
    uint64_t rtend = s->reftable_offset + s->reftable_size * 8;
    if (host < rtend && host + len > s->reftable_offset) {
        return -EIO;
    }
    return 0;
}

/*
 * Return the L2 table for l1i, writable: allocated and not shared (OFLAG_COPIED in L1).
 * A shared table is copied first; a missing one is created zeroed. Pinned in the cache.
 */
int q2_get_l2_for_write(Qcow2State *s, uint64_t l1i, uint8_t **l2)
{
    int ret;
    *l2 = NULL;
    if (l1i >= s->l1_size) {
        return -EIO;
    }
    uint64_t e = s->l1[l1i];
    uint64_t old = e & QCOW2_L1E_OFFSET_MASK;
    if (old & (s->cluster_size - 1)) {
        return -EIO;
    }
    if (old && (e & QCOW2_OFLAG_COPIED)) {
        if (overlap_check(s, old, s->cluster_size) < 0) {
            return -EIO; /* an L2 table on top of the header or a top-level table: corrupt */
        }
        return q2_cache_get(s, &s->l2_cache, old, l2);
    }
    uint8_t *tmp = calloc(1, s->cluster_size);
    if (!tmp) {
        return -ENOMEM;
    }
    if (old) {
        uint8_t *ot;
        ret = q2_cache_get(s, &s->l2_cache, old, &ot);
        if (ret < 0) {
            free(tmp);
            return ret;
        }
        memcpy(tmp, ot, s->cluster_size);
        q2_cache_put(&s->l2_cache, &ot);
    }
    uint64_t newoff;
    ret = q2_alloc_clusters(s, 1, &newoff);
    if (ret < 0) {
        free(tmp);
        return ret;
    }
    /*
     * The refcount of the new table, then the table itself, are durable before L1 points at
     * it. With lazy refcounts the dirty bit stands in for the refcount (repaired after a crash).
     * Each is written durably on its own (FUA: a sync of just that range) rather than by
     * syncing the whole file (QEMU's way): the table holds zeroes or entries already on disk, so
     * no guest data needs to be durable for it, and a whole-file sync here writes back every
     * data byte dirtied since the last one - 0.1-0.3 s each time a mirror into a new image
     * reaches the next 512 MiB of the disk, while s->lock holds every other writer.
     */
    ret = 0;
    if (!q2_refcounts_lazy(s)) {
        ret = q2_cache_write_durable(s, &s->rb_cache);
    }
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, newoff, s->cluster_size, tmp, VD_REQ_FUA);
    }
    if (ret == 0) {
        uint8_t be[8];
        qcow2_put_be64(be, newoff | QCOW2_OFLAG_COPIED);
        ret = vd_pwrite(s->bs->file, s->l1_offset + l1i * 8, 8, be, 0);
    }
    if (ret < 0) {
        free(tmp);
        return ret;
    }
    s->l1[l1i] = newoff | QCOW2_OFLAG_COPIED;
    ret = q2_cache_get_empty(s, &s->l2_cache, newoff, l2);
    if (ret == 0) {
        memcpy(*l2, tmp, s->cluster_size);
    }
    free(tmp);
    if (ret < 0) {
        return ret;
    }
    if (old) {
        ret = q2_free_clusters(s, old, s->cluster_size);
        if (ret < 0) {
            q2_cache_put(&s->l2_cache, l2);
            return ret;
        }
    }
    return 0;
}

static bool entry_inplace(const Qcow2State *s, uint64_t e, uint64_t bm)
{
    if ((e & QCOW2_OFLAG_COMPRESSED) || !(e & QCOW2_OFLAG_COPIED) || !q2_l2e_has_host(s, e)) {
        return false;
    }
    if (q2_has_zero_flag(s) && (e & QCOW2_OFLAG_ZERO)) {
        return false;
    }
    if (s->extl2 && (bm & QCOW2_L2_BITMAP_ALL_ALLOC) != QCOW2_L2_BITMAP_ALL_ALLOC) {
        return false;
    }
    return true;
}

/* Host cluster that a rewrite of the whole cluster may reuse (owned, not compressed). */
static uint64_t entry_reusable_host(const Qcow2State *s, uint64_t e)
{
    if ((e & QCOW2_OFLAG_COMPRESSED) || !(e & QCOW2_OFLAG_COPIED)) {
        return 0;
    }
    return e & QCOW2_L2E_OFFSET_MASK;
}

/* Copy the part of the write [offset, end) (bytes buf) that falls in cluster cstart into b. */
static void overlay_guest_bytes(const Qcow2State *s, uint64_t cstart, uint8_t *b,
                                const uint8_t *buf, uint64_t offset, uint64_t end)
{
    uint64_t cs = s->cluster_size;
    uint64_t from = offset > cstart ? offset : cstart;
    uint64_t to = end < cstart + cs ? end : cstart + cs;
    memcpy(b + (from - cstart), buf + (from - offset), to - from);
}

/*
 * A cluster-sized buffer with the new contents of the guest cluster at cstart: its old view
 * (or zeroes when zero is true) overlaid with the part of [offset, end) that falls inside.
 */
static int cow_buffer(Qcow2State *s, uint64_t cstart, bool zero, const uint8_t *buf,
                      uint64_t offset, uint64_t end, uint8_t **out)
{
    uint64_t cs = s->cluster_size;
    uint8_t *b = zero ? calloc(1, cs) : malloc(cs);
    if (!b) {
        return -ENOMEM;
    }
    if (!zero) {
        int ret = read_guest_cluster(s, cstart, b);
        if (ret < 0) {
            free(b);
            return ret;
        }
    }
    overlay_guest_bytes(s, cstart, b, buf, offset, end);
    *out = b;
    return 0;
}

/* Does an allocating write in flight without the lock cover part of [start, end)? */
static bool alloc_overlaps(const Qcow2State *s, uint64_t start, uint64_t end)
{
    for (const Q2AllocInFlight *a = s->allocs; a; a = a->next) {
        if (a->start < end && start < a->end) {
            return true;
        }
    }
    return false;
}

static void alloc_done(Qcow2State *s, Q2AllocInFlight *me)
{
    for (Q2AllocInFlight **pp = &s->allocs; *pp; pp = &(*pp)->next) {
        if (*pp == me) {
            *pp = me->next;
            break;
        }
    }
    vd_cond_broadcast(&s->alloc_done);
}

/* Does the whole guest cluster at cstart read from the backing file (nothing in this layer)? */
static int cow_from_backing(Qcow2State *s, uint64_t cstart, bool *backing)
{
    uint64_t n = s->cluster_size;
    *backing = false;
    if (!s->bs->backing || cstart >= s->h.size) {
        return 0;
    }
    if (cstart + n > s->h.size) {
        n = s->h.size - cstart;
    }
    Q2Extent x;
    int ret = q2_get_extent(s, cstart, n, false, &x);
    if (ret == 0) {
        *backing = x.type == QCOW2_CLUSTER_UNALLOCATED && x.len == n;
    }
    return ret;
}

/* cow_buffer for a cluster that reads from the backing file: no metadata, no lock needed. */
static int cow_buffer_backing(Qcow2State *s, uint64_t cstart, const uint8_t *buf,
                              uint64_t offset, uint64_t end, uint8_t **out)
{
    uint64_t cs = s->cluster_size;
    uint8_t *b = malloc(cs);
    if (!b) {
        return -ENOMEM;
    }
    uint64_t size = __atomic_load_n(&s->size_pub, __ATOMIC_ACQUIRE);
    uint64_t n = cstart + cs <= size ? cs : size - cstart;
    memset(b + n, 0, cs - n);
    int ret = read_backing(s, cstart, n, b);
    if (ret < 0) {
        free(b);
        return ret;
    }
    overlay_guest_bytes(s, cstart, b, buf, offset, end);
    *out = b;
    return 0;
}

/*
 * Make the newly allocated host cluster at host read as zeroes in the file without writing a
 * buffer of them; <0 when that is not cheap (the caller writes them). An image without a backing
 * file (convert's output) zeroes also at or past the file's end, so map sees the whole cluster as
 * data as qemu-img's (a hole there made vdisk's convert output map differently). An overlay's
 * cluster at or past the file's end is left as a hole, which reads zeroes: that saves a guest's
 * allocating write after a snapshot one fallocate per new cluster (its hot path); only map shows
 * it, as zero ranges inside the allocated cluster, where they read zeroes anyway. Zeroes in the
 * file are not zeroes through a cipher: encrypted images always write them.
 */
static int zero_new_cluster(Qcow2State *s, uint64_t host)
{
    BlockNode *f = q2_data_node(s); /* the image file, or the external data file */
    if (s->crypt.luks || !f) {
        return -ENOTSUP;
    }
    if (s->bs->backing && f->drv->reads_zero_past_end) {
        int64_t len = vd_getlength(f);
        if (len >= 0 && host >= (uint64_t)len) {
            return 0; /* an overlay's cluster at the file's end: a hole reads zeroes */
        }
    }
    return vd_pwrite_zeroes(f, host, s->cluster_size, VD_REQ_NO_FALLBACK);
}

/*
 * The data of an allocating write into the k host clusters at host, for guest [offset, end)
 * inside me's clusters: head/tail copy-on-write (mode 1: zero the cluster, 2: the merged buffer
 * in *hbuf / *tbuf, read here from the backing file when *_backing, or mode 1 after all when the
 * backing reads zeroes there) and the guest bytes. May run without s->lock (it touches no
 * metadata).
 */
int q2_write_new_clusters(Qcow2State *s, const Q2AllocInFlight *me, uint64_t host, uint64_t k,
                          int head_mode, int tail_mode, bool head_backing, bool tail_backing,
                          uint8_t **hbuf, uint8_t **tbuf, const uint8_t *buf, uint64_t offset,
                          uint64_t end)
{
    uint64_t cs = s->cluster_size, cstart = me->start, tstart = me->end - cs;
    int ret = 0;
    /*
     * A partial cluster that reads whole from the backing file: does the backing read it as
     * zeroes (then zero the new cluster, mode 1)? Asked here, without s->lock when unlocked,
     * rather than in write_step: the backing's block status takes the backing's lock, and
     * waiting for it while holding ours stalled every writer of this image behind the
     * backing's I/O (an active commit writing into it). `me` keeps other writers of these guest
     * clusters out meanwhile, and what the backing decides there does not change under us.
     */
    if (head_mode == 2 && head_backing) {
        /* the head cluster's areas around the write: before it, and after it if it ends here */
        bool z = false, z2 = true;
        ret = q2_backing_range_unallocated(s, cstart, offset - cstart, &z);
        if (ret == 0 && z && end < cstart + cs) {
            ret = q2_backing_range_unallocated(s, end, cstart + cs - end, &z2);
        }
        head_mode = ret == 0 && z && z2 ? 1 : head_mode;
    }
    if (ret == 0 && tail_mode == 2 && tail_backing) {
        bool z = false;
        ret = q2_backing_range_unallocated(s, end, tstart + cs - end, &z);
        tail_mode = ret == 0 && z ? 1 : tail_mode;
    }
    if (ret == 0 && head_mode == 2 && head_backing) {
        ret = cow_buffer_backing(s, cstart, buf, offset, end, hbuf);
    }
    if (ret == 0 && tail_mode == 2 && tail_backing) {
        ret = cow_buffer_backing(s, tstart, buf, offset, end, tbuf);
    }
    /*
     * As QEMU's qcow2 (is_zero_cow): the copy-on-write areas of one allocation are zeroed in
     * the file only when all of them read zeroes; when one is merged from old data, the other
     * is written out as zeroes too (same content, the map QEMU's shows).
     */
    if (ret == 0 && head_mode == 1 && tail_mode == 2) {
        head_mode = 2;
        ret = cow_buffer(s, cstart, true, buf, offset, end, hbuf);
    }
    if (ret == 0 && tail_mode == 1 && head_mode == 2) {
        tail_mode = 2;
        ret = cow_buffer(s, tstart, true, buf, offset, end, tbuf);
    }
    /* data first: zero the untouched parts in the file where that is cheap */
    if (ret == 0 && head_mode == 1 && zero_new_cluster(s, host) < 0) {
        head_mode = 2;
        ret = cow_buffer(s, cstart, true, buf, offset, end, hbuf);
    }
    if (ret == 0 && tail_mode == 1 && zero_new_cluster(s, host + (k - 1) * cs) < 0) {
        tail_mode = 2;
        ret = cow_buffer(s, tstart, true, buf, offset, end, tbuf);
    }
    uint64_t ds = offset, de = end;
    if (ret == 0 && head_mode == 2) {
        ret = data_pwrite(s, host, cs, *hbuf);
        ds = cstart + cs;
    }
    if (ret == 0 && tail_mode == 2) {
        ret = data_pwrite(s, host + (k - 1) * cs, cs, *tbuf);
        de = tstart;
    }
    if (ret == 0 && ds < de) {
        ret = data_pwrite(s, host + (ds - cstart), de - ds, buf + (ds - offset));
    }
    return ret;
}

/*
 * The guest view of [off, off + n) (zeroes past the virtual size), read under s->lock: the old
 * contents of a subcluster that a write covers only in part.
 */
static int read_guest_range(Qcow2State *s, uint64_t off, uint64_t n, uint8_t *buf)
{
    uint64_t have = off >= s->h.size ? 0 : (n < s->h.size - off ? n : s->h.size - off);
    memset(buf + have, 0, n - have);
    return have ? q2_read(s, off, have, buf) : 0;
}

/*
 * Extended L2: may a write that covers the guest cluster with entry e only in part allocate just
 * the subclusters it touches? Yes unless the cluster is compressed, as QEMU's qcow2 does: a 4 KiB
 * write into a 64 KiB cluster after an external snapshot then copies one 2 KiB subcluster's
 * worth from the backing file at most, not the whole cluster, which is what extended L2 is for.
 * A host cluster shared with an internal snapshot is copied from its first allocated subcluster
 * to its last one (write_subclusters).
 */
static bool subcluster_write(const Qcow2State *s, uint64_t e, uint64_t in_off, uint64_t bytes)
{
    return s->extl2 && !(e & QCOW2_OFLAG_COMPRESSED) && (in_off != 0 || bytes < s->cluster_size);
}

/*
 * One step of a write that subcluster_write() allows, inside the cluster at l2 index idx0:
 * the touched subclusters get the new bytes (the untouched part of the first and last one
 * keeps its old guest view), their allocation bits are set and zero bits cleared; the other
 * subclusters stay as they were (unallocated ones read through to the backing file). A host
 * cluster shared with a snapshot (not COPIED) moves to a new one, as QEMU's copy-on-write: the
 * span from the first allocated or touched subcluster to the last one is copied (its old
 * guest view), the subclusters outside it keep their bits. The data goes in without the lock
 * as in write_step. Returns bytes done, 0 to redo, or -errno.
 */
static int64_t write_subclusters(Qcow2State *s, uint64_t l1i, uint64_t idx0, uint8_t *l2,
                                 uint64_t offset, uint64_t bytes, const uint8_t *buf,
                                 bool may_unlock)
{
    uint64_t cs = s->cluster_size, scs = s->sc_size;
    uint64_t in_off = offset & (cs - 1), cstart = offset - in_off;
    uint64_t n = bytes < cs - in_off ? bytes : cs - in_off;
    unsigned sc0 = (unsigned)(in_off / scs), sc1 = (unsigned)((in_off + n - 1) / scs);
    uint64_t e0 = q2_l2e_get(s, l2, idx0);
    uint32_t alloc0 = (uint32_t)q2_l2e_bitmap(s, l2, idx0);
    bool shared = q2_l2e_has_host(s, e0) && !(e0 & QCOW2_OFLAG_COPIED);
    if (shared && alloc0) {
        unsigned first = (unsigned)__builtin_ctz(alloc0), last = 31u - __builtin_clz(alloc0);
        sc0 = first < sc0 ? first : sc0;
        sc1 = last > sc1 ? last : sc1;
    }
    uint64_t span = cstart + sc0 * scs, span_len = (uint64_t)(sc1 - sc0 + 1) * scs;
    uint64_t mask = ((1ULL << (sc1 + 1)) - 1) & ~((1ULL << sc0) - 1); /* sc0..sc1 */
    uint8_t *sbuf = NULL;
    int ret = 0;

    Q2AllocInFlight me = {.start = cstart, .end = cstart + cs};
    if (alloc_overlaps(s, me.start, me.end)) {
        q2_cache_put(&s->l2_cache, &l2);
        vd_cond_wait(&s->alloc_done, &s->lock);
        return 0;
    }
    const uint8_t *src = buf;
    if (offset != span || n != span_len) {
        /* old guest view of the first and last subcluster, overlaid with the new bytes */
        sbuf = malloc(span_len);
        if (!sbuf) {
            ret = -ENOMEM;
            goto out;
        }
        if (shared) {
            ret = read_guest_range(s, span, span_len, sbuf);
        } else if (offset != span) {
            ret = read_guest_range(s, span, scs, sbuf);
        }
        if (ret == 0 && !shared && offset + n != span + span_len) {
            ret = read_guest_range(s, span + span_len - scs, scs, sbuf + span_len - scs);
        }
        if (ret < 0) {
            goto out;
        }
        memcpy(sbuf + (offset - span), buf, n);
        src = sbuf;
    }
    uint64_t host = e0 & QCOW2_L2E_OFFSET_MASK;
    if (!q2_l2e_has_host(s, e0) || shared) {
        if (s->has_data_file && !shared) {
            host = cstart; /* data file: the guest offset, not refcounted */
        } else if ((ret = q2_alloc_clusters(s, 1, &host)) < 0) {
            goto out;
        }
    }
    if (host & (cs - 1)) {
        ret = -EIO;
        goto out;
    }
    if ((ret = overlap_check(s, host + sc0 * scs, span_len)) < 0) {
        goto out;
    }
    q2_cache_put(&s->l2_cache, &l2);
    me.next = s->allocs;
    s->allocs = &me;
    bool unlocked = may_unlock && lockless_begin(s);
    ret = data_pwrite(s, host + sc0 * scs, span_len, src);
    if (unlocked) {
        lockless_end(s);
    }
    q2_data_written(s);
    if (ret == 0) {
        ret = q2_get_l2_for_write(s, l1i, &l2);
    }
    if (ret == 0) {
        /* others of this cluster waited on `me`; zero/discard wait for lockless idle */
        uint64_t bm = q2_l2e_bitmap(s, l2, idx0), old = q2_l2e_get(s, l2, idx0);
        q2_cache_mark_dirty(&s->l2_cache, l2);
        q2_l2e_set(s, l2, idx0, host | QCOW2_OFLAG_COPIED, (bm | mask) & ~(mask << 32));
        if (shared) {
            ret = q2_defer_free_l2_entry(s, old); /* the snapshot's reference stays */
        }
    }
    alloc_done(s, &me); /* a new host cluster leaks on failure; the old mapping is untouched */
out:
    free(sbuf);
    q2_cache_put(&s->l2_cache, &l2);
    return ret < 0 ? ret : (int64_t)n;
}

/* One step of a write: at most one L2 table's worth. Returns bytes done or -errno. */
static int64_t write_step(Qcow2State *s, uint64_t offset, uint64_t bytes, const uint8_t *buf,
                          bool may_unlock)
{
    uint64_t cs = s->cluster_size;
    uint64_t l1i = offset >> (s->cluster_bits + s->l2_bits);
    uint64_t idx0 = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    uint64_t in_off = offset & (cs - 1);
    uint8_t *l2;
    int ret = q2_get_l2_for_write(s, l1i, &l2);
    if (ret < 0) {
        return ret;
    }
    uint64_t e0 = q2_l2e_get(s, l2, idx0);
    uint64_t bm0 = q2_l2e_bitmap(s, l2, idx0);

    if (entry_inplace(s, e0, bm0)) {
        uint64_t base = e0 & QCOW2_L2E_OFFSET_MASK;
        uint64_t n = cs - in_off < bytes ? cs - in_off : bytes;
        uint64_t idx = idx0 + 1;
        while (n < bytes && idx < s->l2_entries) {
            uint64_t e = q2_l2e_get(s, l2, idx);
            if (!entry_inplace(s, e, q2_l2e_bitmap(s, l2, idx)) ||
                (e & QCOW2_L2E_OFFSET_MASK) != base + (idx - idx0) * cs) {
                break;
            }
            n += bytes - n < cs ? bytes - n : cs;
            idx++;
        }
        q2_cache_put(&s->l2_cache, &l2);
        if (base & (cs - 1)) {
            return -EIO;
        }
        ret = overlap_check(s, base + in_off, n);
        q2_data_written(s);
        if (ret == 0) {
            /*
             * An owned (COPIED), allocated cluster: no allocation, no COW, the mapping stays.
             * Registered in lockless_inflight, nothing can free or reuse it meanwhile.
             */
            if (may_unlock && lockless_begin(s)) {
                ret = data_pwrite(s, base + in_off, n, buf);
                lockless_end(s);
                q2_data_written(s); /* a metadata flush meanwhile may have cleared it */
            } else {
                ret = data_pwrite(s, base + in_off, n, buf);
            }
        }
        return ret < 0 ? ret : (int64_t)n;
    }

    if (subcluster_write(s, e0, in_off, bytes)) {
        return write_subclusters(s, l1i, idx0, l2, offset, bytes, buf, may_unlock);
    }

    /* New contents for k whole clusters. */
    uint64_t reuse = entry_reusable_host(s, e0);
    uint64_t k = 1;
    if (!reuse) {
        uint64_t covered = cs - in_off;
        uint64_t idx = idx0 + 1;
        while (covered < bytes && idx < s->l2_entries) {
            uint64_t e = q2_l2e_get(s, l2, idx);
            if (entry_inplace(s, e, q2_l2e_bitmap(s, l2, idx)) || entry_reusable_host(s, e)) {
                break;
            }
            covered += cs;
            k++;
            idx++;
        }
    }
    uint64_t n = k * cs - in_off;
    if (n > bytes) {
        n = bytes;
        if (s->extl2 && k > 1) {
            k--; /* the partial last cluster is the next step's, by subcluster (as QEMU's) */
            n = k * cs - in_off;
        }
    }
    uint64_t cstart = offset - in_off;
    uint64_t end = offset + n;
    bool head_partial = in_off != 0 || n < cs;
    bool tail_partial = k > 1 && (end & (cs - 1)) != 0;
    uint64_t tstart = end & ~(cs - 1);
    /* 0: no copy-on-write; 1: rest reads zero (zero the host cluster); 2: merge in a buffer */
    int head_mode = 0, tail_mode = 0;
    uint8_t *hbuf = NULL, *tbuf = NULL;
    uint64_t host = 0;

    bool z;
    if (head_partial) {
        ret = q2_cluster_reads_zero(s, cstart, &z);
        if (ret < 0) {
            goto out;
        }
        head_mode = z ? 1 : 2;
    }
    if (tail_partial) {
        ret = q2_cluster_reads_zero(s, tstart, &z);
        if (ret < 0) {
            goto out;
        }
        tail_mode = z ? 1 : 2;
    }
    /*
     * Another allocating write of these guest clusters still in flight without the lock (below):
     * wait until it put its L2 entries in, then redo this step on the new mapping.
     */
    Q2AllocInFlight me = {.start = cstart, .end = cstart + k * cs};
    if (alloc_overlaps(s, me.start, me.end)) {
        q2_cache_put(&s->l2_cache, &l2);
        vd_cond_wait(&s->alloc_done, &s->lock);
        return 0;
    }
    /*
     * Old contents: read now (under the lock, before the mapping can change) unless they come
     * whole from the backing file, read-only below, which the unlocked part reads itself.
     */
    bool head_backing = false, tail_backing = false;
    if (head_mode == 2) {
        ret = cow_from_backing(s, cstart, &head_backing);
        if (ret == 0 && !head_backing) {
            ret = cow_buffer(s, cstart, false, buf, offset, end, &hbuf);
        }
        if (ret < 0) {
            goto out;
        }
    }
    if (tail_mode == 2) {
        ret = cow_from_backing(s, tstart, &tail_backing);
        if (ret == 0 && !tail_backing) {
            ret = cow_buffer(s, tstart, false, buf, offset, end, &tbuf);
        }
        if (ret < 0) {
            goto out;
        }
    }
    if (reuse) {
        host = reuse;
        if (host & (cs - 1)) {
            ret = -EIO;
            goto out;
        }
        ret = overlap_check(s, host, cs);
        if (ret < 0) {
            goto out;
        }
    } else if (s->has_data_file) {
        host = cstart; /* data file: the guest offset, not refcounted */
    } else {
        ret = q2_alloc_clusters(s, k, &host);
        if (ret < 0) {
            goto out;
        }
    }
    /*
     * The data goes in without the lock (as QEMU's qcow2 writes outside its lock): the new
     * clusters are ours (refcount taken, no L2 entry points at them yet), `me` keeps other
     * writers of these guest clusters out, and lockless_inflight keeps whatever frees or
     * repurposes clusters (discard, zero, flush's deferred frees, truncate, check) waiting. The
     * L2 table is re-fetched afterwards: nothing can replace it meanwhile (that too waits).
     */
    q2_cache_put(&s->l2_cache, &l2);
    me.next = s->allocs;
    s->allocs = &me;
    bool unlocked = may_unlock && lockless_begin(s);
    ret = q2_write_new_clusters(s, &me, host, k, head_mode, tail_mode, head_backing, tail_backing,
                                &hbuf, &tbuf, buf, offset, end);
    if (unlocked) {
        lockless_end(s);
    }
    q2_data_written(s);
    if (ret == 0) {
        ret = q2_get_l2_for_write(s, l1i, &l2);
    }
    if (ret < 0) {
        alloc_done(s, &me);
        goto out; /* the new clusters leak; the old mapping is untouched */
    }
    /* then the mapping; old clusters are released later (batched, after the new entries) */
    q2_cache_mark_dirty(&s->l2_cache, l2);
    for (uint64_t i = 0; i < k; i++) {
        uint64_t old = q2_l2e_get(s, l2, idx0 + i);
        q2_l2e_set(s, l2, idx0 + i, (host + i * cs) | QCOW2_OFLAG_COPIED,
                   QCOW2_L2_BITMAP_ALL_ALLOC);
        if (!reuse && ((old & QCOW2_OFLAG_COMPRESSED) || (old & QCOW2_L2E_OFFSET_MASK))) {
            int r = q2_defer_free_l2_entry(s, old);
            if (r < 0 && ret == 0) {
                ret = r;
            }
        }
    }
    alloc_done(s, &me); /* after the entries: a waiter redoes its step on them */
out:
    free(hbuf);
    free(tbuf);
    q2_cache_put(&s->l2_cache, &l2);
    return ret < 0 ? ret : (int64_t)n;
}

static int write_impl(Qcow2State *s, uint64_t offset, uint64_t bytes, const uint8_t *buf,
                      bool may_unlock)
{
    while (bytes > 0) {
        int64_t n = write_step(s, offset, bytes, buf, may_unlock);
        if (n < 0) {
            return (int)n;
        }
        offset += (uint64_t)n;
        bytes -= (uint64_t)n;
        buf += n;
    }
    return 0;
}

int q2_write(Qcow2State *s, uint64_t offset, uint64_t bytes, const uint8_t *buf)
{
    return write_impl(s, offset, bytes, buf, false);
}

int q2_write_unlocked_data(Qcow2State *s, uint64_t offset, uint64_t bytes, const uint8_t *buf)
{
    return write_impl(s, offset, bytes, buf, true);
}

int q2_compress_cluster(Qcow2State *s, uint64_t offset, uint64_t n, const uint8_t *buf,
                        uint8_t *in, uint8_t *out)
{
    uint64_t cs = s->cluster_size;
    if ((offset & (cs - 1)) || n == 0 || n > cs || (n < cs && offset + n < s->h.size)) {
        return -EINVAL; /* only whole clusters (or the image's tail) */
    }
    memcpy(in, buf, n);
    memset(in + n, 0, cs - n);
    int clen = q2_compress(s, in, out, cs - 1);
    return clen < 0 ? 0 : clen; /* incompressible: 0, stored plainly */
}

int q2_write_compressed_cluster(Qcow2State *s, uint64_t offset, uint64_t n, const uint8_t *buf,
                                const uint8_t *out, int clen)
{
    if (s->has_data_file) {
        return -ENOTSUP; /* as QEMU: no compressed clusters with an external data file */
    }
    if (clen <= 0) {
        return q2_write(s, offset, n, buf);
    }
    uint8_t *l2;
    uint64_t l1i = offset >> (s->cluster_bits + s->l2_bits);
    uint64_t idx = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    int ret = q2_get_l2_for_write(s, l1i, &l2);
    if (ret < 0) {
        return ret;
    }
    uint64_t host;
    ret = q2_alloc_bytes(s, (uint64_t)clen, &host);
    if (ret == 0 && (host >> s->csize_shift)) {
        ret = -EFBIG;
    }
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, host, (uint64_t)clen, out, 0);
        q2_data_written(s);
    }
    if (ret < 0) {
        q2_cache_put(&s->l2_cache, &l2);
        return ret;
    }
    uint64_t nsec = ((host + (uint64_t)clen - 1) >> 9) - (host >> 9);
    uint64_t old = q2_l2e_get(s, l2, idx);
    q2_l2e_set(s, l2, idx, QCOW2_OFLAG_COMPRESSED | (nsec << s->csize_shift) | host, 0);
    q2_cache_mark_dirty(&s->l2_cache, l2);
    q2_cache_put(&s->l2_cache, &l2);
    if ((old & QCOW2_OFLAG_COMPRESSED) || (old & QCOW2_L2E_OFFSET_MASK)) {
        ret = q2_free_l2_entry_cluster(s, old);
    }
    return ret;
}

int q2_block_status(Qcow2State *s, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                    uint64_t *map)
{
    Q2Extent x;
    int ret = q2_get_extent(s, offset, bytes, true, &x);
    if (ret < 0) {
        return ret;
    }
    *pnum = x.len;
    switch (x.type) {
    case QCOW2_CLUSTER_NORMAL:
        *map = x.host;
        return VD_BS_DATA | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID;
    case QCOW2_CLUSTER_ZERO_ALLOC:
        *map = x.host;
        return VD_BS_ZERO | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID;
    case QCOW2_CLUSTER_ZERO_PLAIN:
        return VD_BS_ZERO | VD_BS_ALLOCATED;
    case QCOW2_CLUSTER_COMPRESSED:
        return VD_BS_DATA | VD_BS_ALLOCATED;
    default:
        if (x.host_valid) {
            *map = x.host; /* extended L2: unallocated subclusters of a host cluster */
            return VD_BS_OFFSET_VALID;
        }
        return 0;
    }
}

static int write_file_zeroes(Qcow2State *s, uint64_t host, uint64_t len)
{
    uint64_t chunk = len < (4ULL << 20) ? len : (4ULL << 20);
    uint8_t *z = calloc(1, chunk);
    int ret = 0;
    if (!z) {
        return -ENOMEM;
    }
    while (len > 0 && ret == 0) {
        uint64_t n = len < chunk ? len : chunk;
        ret = vd_pwrite(q2_data_node(s), host, n, z, 0);
        host += n;
        len -= n;
    }
    free(z);
    return ret;
}

int q2_preallocate(Qcow2State *s, uint64_t offset, uint64_t end, VdPrealloc mode)
{
    uint64_t cs = s->cluster_size;
    uint64_t c = offset >> s->cluster_bits;
    uint64_t endc = (end + cs - 1) >> s->cluster_bits;
    int ret = 0;
    while (c < endc) {
        uint64_t l1i = c >> s->l2_bits;
        uint64_t idx = c & (s->l2_entries - 1);
        uint8_t *l2;
        ret = q2_get_l2_for_write(s, l1i, &l2);
        if (ret < 0) {
            return ret;
        }
        while (idx < s->l2_entries && c < endc) {
            uint64_t e = q2_l2e_get(s, l2, idx);
            if ((e & QCOW2_OFLAG_COMPRESSED) || q2_l2e_has_host(s, e)) {
                idx++;
                c++;
                continue;
            }
            uint64_t k = 1;
            while (idx + k < s->l2_entries && c + k < endc &&
                   !(q2_l2e_get(s, l2, idx + k) & QCOW2_OFLAG_COMPRESSED) &&
                   !q2_l2e_has_host(s, q2_l2e_get(s, l2, idx + k))) {
                k++;
            }
            uint64_t host = c << s->cluster_bits; /* data file: identity, not refcounted */
            ret = s->has_data_file ? 0 : q2_alloc_clusters(s, k, &host);
            if (ret < 0) {
                q2_cache_put(&s->l2_cache, &l2);
                return ret;
            }
            if (mode == VD_PREALLOC_FALLOC) {
                ret = vd_pwrite_zeroes(q2_data_node(s), host, k * cs, 0);
            } else if (mode == VD_PREALLOC_FULL) {
                ret = write_file_zeroes(s, host, k * cs);
            }
            if (ret < 0) {
                q2_cache_put(&s->l2_cache, &l2);
                return ret;
            }
            q2_data_written(s);
            for (uint64_t i = 0; i < k; i++) {
                uint64_t old = q2_l2e_get(s, l2, idx + i);
                uint64_t ne = (host + i * cs) | QCOW2_OFLAG_COPIED;
                /*
                 * Extended L2 (as qemu): the subclusters stay unallocated, so a backing file
                 * still shows through; zero bits are kept.
                 */
                uint64_t nbm = q2_l2e_bitmap(s, l2, idx + i) & QCOW2_L2_BITMAP_ALL_ZEROES;
                if (q2_has_zero_flag(s) && (old & QCOW2_OFLAG_ZERO)) {
                    ne |= QCOW2_OFLAG_ZERO; /* stays zero, now preallocated */
                }
                q2_l2e_set(s, l2, idx + i, ne, nbm);
            }
            q2_cache_mark_dirty(&s->l2_cache, l2);
            idx += k;
            c += k;
        }
        q2_cache_put(&s->l2_cache, &l2);
    }
    return 0;
}

int q2_grow_l1(Qcow2State *s, uint64_t min_size)
{
    uint64_t cs = s->cluster_size;
    if (min_size <= s->l1_size) {
        return 0;
    }
    if (min_size * 8 > QCOW2_MAX_L1_SIZE) {
        return -EFBIG;
    }
    uint64_t bytes = (min_size * 8 + cs - 1) & ~(cs - 1);
    uint8_t *t = calloc(1, bytes);
    uint64_t *nl1 = calloc(min_size, sizeof(uint64_t));
    if (!t || !nl1) {
        free(t);
        free(nl1);
        return -ENOMEM;
    }
    memcpy(nl1, s->l1, (size_t)s->l1_size * 8);
    for (uint64_t i = 0; i < min_size; i++) {
        qcow2_put_be64(t + 8 * i, nl1[i]);
    }
    uint64_t off;
    int ret = q2_alloc_clusters(s, bytes / cs, &off);
    if (ret == 0) {
        ret = q2_cache_flush(s, &s->rb_cache);
    }
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, off, bytes, t, 0);
    }
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    free(t);
    if (ret == 0) {
        uint8_t hdr[12];
        qcow2_put_be32(hdr, (uint32_t)min_size);
        qcow2_put_be64(hdr + 4, off);
        ret = q2_write_header_field(s, 36, hdr, 12);
    }
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret < 0) {
        free(nl1);
        return ret;
    }
    uint64_t old_off = s->l1_offset;
    uint64_t old_bytes = ((uint64_t)s->l1_size * 8 + cs - 1) & ~(cs - 1);
    free(s->l1);
    s->l1 = nl1;
    s->l1_size = (uint32_t)min_size;
    s->l1_offset = off;
    s->h.l1_size = (uint32_t)min_size;
    s->h.l1_table_offset = off;
    if (old_off && old_bytes) {
        ret = q2_free_clusters(s, old_off, old_bytes);
    }
    return ret;
}
