/*
 * qcow2-zero.c - qcow2 write-zeroes and discard: does a range read as zeroes (this layer, its
 * backing chain: block status only), and L2 entries made to read zeroes (the zero flag, extended
 * L2's subcluster bits) or unallocated, the host clusters they owned released afterwards.
 *
 * Promises: write-zeroes zeroes in metadata exactly where QEMU's qcow2 does (so qemu-img map of
 * the image equals QEMU's for the same requests) and writes zeroes elsewhere; a discard never
 * exposes backing data (a v2 image with a backing file keeps its clusters). Runs under s->lock.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2.h"

static int write_zero_bytes(Qcow2State *s, uint64_t offset, uint64_t bytes)
{
    uint64_t chunk = bytes < (1ULL << 20) ? bytes : (1ULL << 20);
    uint8_t *z = calloc(1, chunk);
    if (!z) {
        return -ENOMEM;
    }
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        uint64_t n = bytes < chunk ? bytes : chunk;
        ret = q2_write(s, offset, n, z);
        offset += n;
        bytes -= n;
    }
    free(z);
    return ret;
}

/* Does the backing chain read [offset, offset+bytes) as zeroes? Block status only, no data read. */
static int backing_reads_zero(Qcow2State *s, uint64_t offset, uint64_t bytes, bool *zero)
{
    BlockNode *b = s->bs->backing;
    int64_t bl = vd_getlength(b);
    if (bl < 0) {
        return (int)bl;
    }
    uint64_t end = offset + bytes < (uint64_t)bl ? offset + bytes : (uint64_t)bl;
    *zero = true;
    while (offset < end) {
        VdBlockStatus st;
        uint64_t pnum;
        int ret = vd_block_status_above(b, NULL, offset, end - offset, &pnum, &st);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0 || !(st.flags & VD_BS_ZERO)) {
            *zero = false;
            return 0;
        }
        offset += pnum;
    }
    return 0;
}

/*
 * Is the guest cluster at cstart unallocated in every layer of its chain (QEMU's is_zero_cow)?
 * A partial write into such a cluster zeroes the new host cluster in the file (fallocate) and
 * writes only the guest's bytes, instead of a cluster-sized buffer that is mostly zeroes: after
 * a snapshot, every first write into an empty area of the disk is such a write. A zero cluster,
 * or a backing file that allocates the range or ends before it, gets its zeroes written as
 * QEMU's does (their blocks then hold data in the file, as qemu-img map shows). This answers
 * for this image only: a cluster it leaves whole to a backing file reads false here, and
 * q2_write_new_clusters asks the backing (q2_backing_range_unallocated, without our lock).
 */
int q2_cluster_reads_zero(Qcow2State *s, uint64_t cstart, bool *zero)
{
    uint64_t n = s->cluster_size;
    *zero = true;
    if (cstart >= s->h.size) {
        return 0;
    }
    if (cstart + n > s->h.size) {
        n = s->h.size - cstart;
    }
    Q2Extent x;
    int ret = q2_get_extent(s, cstart, n, false, &x);
    *zero = ret == 0 && x.type == QCOW2_CLUSTER_UNALLOCATED && x.len == n && !s->bs->backing;
    return ret;
}

/*
 * Does no layer of the backing chain allocate [off, off + n) (a copy-on-write area of a cluster
 * this image leaves to it whole)? QEMU's is_zero_cow asks the areas the write does not cover,
 * not the whole cluster. A backing file ending before the area's end counts as allocating it,
 * as QEMU's block status says of zeroes past a layer's end. Block status only. Needs no
 * s->lock (it reads no metadata of this image).
 */
int q2_backing_range_unallocated(Qcow2State *s, uint64_t off, uint64_t n, bool *zero)
{
    uint64_t size = __atomic_load_n(&s->size_pub, __ATOMIC_ACQUIRE);
    *zero = true;
    if (off >= size || n == 0) {
        return 0;
    }
    if (off + n > size) {
        n = size - off;
    }
    BlockNode *b = s->bs->backing;
    int64_t bl = vd_getlength(b);
    if (bl < 0) {
        return (int)bl;
    }
    if (off + n > (uint64_t)bl) {
        *zero = false;
        return 0;
    }
    for (uint64_t end = off + n; off < end && *zero;) {
        uint64_t pnum;
        int ret = vd_is_allocated_above(b, NULL, off, end - off, &pnum);
        if (ret < 0) {
            return ret;
        }
        *zero = ret == 0 && pnum > 0;
        off += pnum;
    }
    return 0;
}

enum { SET_UNALLOC, SET_ZERO };

/*
 * Rewrite the entries of whole clusters [first, first+count) (guest cluster indexes):
 * SET_UNALLOC makes them unallocated; SET_ZERO makes them read as zeroes (keeping an owned,
 * uncompressed host cluster unless unmap). Old host clusters are released afterwards.
 */
static int set_entries(Qcow2State *s, uint64_t first, uint64_t count, int mode, bool unmap)
{
    int ret = 0;
    uint64_t c = first, endc = first + count;
    while (c < endc && ret == 0) {
        uint64_t l1i = c >> s->l2_bits;
        uint64_t idx = c & (s->l2_entries - 1);
        uint64_t n = s->l2_entries - idx;
        if (n > endc - c) {
            n = endc - c;
        }
        uint64_t l1e = l1i < s->l1_size ? s->l1[l1i] : 0;
        if (mode == SET_UNALLOC && !(l1e & QCOW2_L1E_OFFSET_MASK)) {
            c += n; /* nothing mapped here */
            continue;
        }
        uint8_t *l2;
        ret = q2_get_l2_for_write(s, l1i, &l2);
        if (ret < 0) {
            return ret;
        }
        uint64_t *olds = malloc(n * sizeof(uint64_t));
        if (!olds) {
            q2_cache_put(&s->l2_cache, &l2);
            return -ENOMEM;
        }
        uint64_t nold = 0;
        bool changed = false;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t old = q2_l2e_get(s, l2, idx + i);
            uint64_t obm = q2_l2e_bitmap(s, l2, idx + i);
            uint64_t ne = 0, nbm = 0;
            bool release;
            Qcow2ClusterType t = q2_cluster_type(s, old);
            if (mode == SET_UNALLOC) {
                release = true;
            } else {
                /*
                 * As QEMU: a compressed cluster is always dropped, an allocated one only on
                 * unmap; otherwise the entry keeps its host cluster (owned or shared with a
                 * snapshot) and only reads as zeroes.
                 */
                release = t == QCOW2_CLUSTER_COMPRESSED || (unmap && q2_l2e_has_host(s, old));
                ne = release ? 0 : old;
                if (s->extl2) {
                    nbm = QCOW2_L2_BITMAP_ALL_ZEROES;
                } else {
                    ne |= QCOW2_OFLAG_ZERO;
                }
            }
            if (ne == old && nbm == obm) {
                continue;
            }
            if (s->has_data_file && t != QCOW2_CLUSTER_COMPRESSED && q2_l2e_has_host(s, old) &&
                (release || s->data_file_raw)) {
                /*
                 * As QEMU: a released data file cluster is discarded there, and a raw data file
                 * must read what the guest reads, so its zeroed clusters are zeroed there too.
                 */
                uint64_t host = old & QCOW2_L2E_OFFSET_MASK;
                BlockNode *data = s->bs->data_file;
                int r = data ? vd_pwrite_zeroes(data, host, s->cluster_size,
                                                release ? VD_REQ_MAY_UNMAP : 0)
                             : -EIO;
                if (r < 0) {
                    ret = r;
                    break;
                }
            }
            q2_l2e_set(s, l2, idx + i, ne, nbm);
            changed = true;
            if (release && ((old & QCOW2_OFLAG_COMPRESSED) || (old & QCOW2_L2E_OFFSET_MASK))) {
                olds[nold++] = old;
            }
        }
        if (changed) {
            q2_cache_mark_dirty(&s->l2_cache, l2);
        }
        q2_cache_put(&s->l2_cache, &l2);
        for (uint64_t j = 0; j < nold && ret == 0; j++) {
            ret = q2_free_l2_entry_cluster(s, olds[j]);
        }
        free(olds);
        c += n;
    }
    return ret;
}

/*
 * Extended L2: make the subclusters in mask of the cluster at cstart read as zeroes in metadata
 * (zero bits set, allocation bits cleared; a host cluster stays where it is). The caller made
 * sure the cluster is not compressed.
 */
static int set_subclusters_zero(Qcow2State *s, uint64_t cstart, uint64_t mask)
{
    uint64_t c = cstart >> s->cluster_bits;
    uint64_t l1i = c >> s->l2_bits, idx = c & (s->l2_entries - 1);
    uint8_t *l2;
    int ret = q2_get_l2_for_write(s, l1i, &l2);
    if (ret < 0) {
        return ret;
    }
    uint64_t bm = q2_l2e_bitmap(s, l2, idx);
    uint64_t nbm = (bm & ~mask) | (mask << 32);
    if (nbm != bm) {
        q2_l2e_set(s, l2, idx, q2_l2e_get(s, l2, idx), nbm);
        q2_cache_mark_dirty(&s->l2_cache, l2);
    }
    q2_cache_put(&s->l2_cache, &l2);
    return 0;
}

/* The subclusters sc of [a, b) (subcluster-aligned, inside one cluster) as a bitmap mask. */
static uint64_t subcluster_mask(const Qcow2State *s, uint64_t a, uint64_t b)
{
    uint64_t in = a & (s->cluster_size - 1);
    unsigned sc0 = (unsigned)(in / s->sc_size);
    unsigned sc1 = (unsigned)((in + (b - a)) / s->sc_size); /* exclusive */
    return ((1ULL << sc1) - 1) & ~((1ULL << sc0) - 1);
}

/*
 * Does [offset, offset+bytes) read as zeroes through the whole chain, by metadata and block
 * status only (QEMU's is_zero for a partial zero request)? Clipped to the virtual size.
 */
static int chain_reads_zero(Qcow2State *s, uint64_t offset, uint64_t bytes, bool *zero)
{
    uint64_t end = offset + bytes < s->h.size ? offset + bytes : s->h.size;
    *zero = true;
    while (offset < end && *zero) {
        Q2Extent x;
        int ret = q2_get_extent(s, offset, end - offset, true, &x);
        if (ret < 0) {
            return ret;
        }
        if (x.type == QCOW2_CLUSTER_UNALLOCATED) {
            if (s->bs->backing && (ret = backing_reads_zero(s, offset, x.len, zero)) < 0) {
                return ret;
            }
        } else if (x.type != QCOW2_CLUSTER_ZERO_PLAIN && x.type != QCOW2_CLUSTER_ZERO_ALLOC) {
            *zero = false;
        }
        offset += x.len;
    }
    return 0;
}

/*
 * Extended L2: make the subclusters of [a, b) (subcluster-aligned, inside the cluster at
 * cstart) read as zeroes in metadata, as QEMU's; a compressed cluster cannot be zeroed in part
 * (-ENOTSUP: the caller writes the zeroes). A raw data file is zeroed there too.
 */
static int zero_subclusters(Qcow2State *s, uint64_t cstart, uint64_t a, uint64_t b)
{
    Q2Extent x;
    int ret = q2_get_extent(s, cstart, s->cluster_size, false, &x);
    if (ret < 0) {
        return ret;
    }
    if (x.type == QCOW2_CLUSTER_COMPRESSED) {
        return -ENOTSUP;
    }
    if (s->has_data_file && s->data_file_raw) {
        BlockNode *data = s->bs->data_file;
        ret = data ? vd_pwrite_zeroes(data, a, b - a, 0) : -EIO;
        if (ret < 0) {
            return ret;
        }
    }
    return set_subclusters_zero(s, cstart, subcluster_mask(s, a, b));
}

/*
 * Zero [a, b) in metadata (QEMU's qcow2_subcluster_zeroize): a starts a zero unit and b ends
 * one or is the image's end. Subclusters of a partial first or last cluster get their zero
 * bits, whole clusters zero entries; a v2 image without a backing file drops the clusters.
 * -ENOTSUP: the zeroes have to be written.
 */
static int zeroize(Qcow2State *s, uint64_t a, uint64_t b, int flags)
{
    uint64_t cs = s->cluster_size;
    if (s->h.version < 3) {
        if (s->bs->backing) {
            return -ENOTSUP;
        }
        return set_entries(s, a >> s->cluster_bits, ((b + cs - 1) >> s->cluster_bits) -
                           (a >> s->cluster_bits), SET_UNALLOC, true);
    }
    uint64_t scs = s->sc_size;
    bool at_end = b >= s->h.size;
    int ret = 0;
    if (a & (cs - 1)) {
        /* a partial first cluster, by subclusters (the image's partial last one counts whole) */
        uint64_t cstart = a & ~(cs - 1);
        uint64_t he = at_end ? (b + scs - 1) & ~(scs - 1) : b;
        if (he > cstart + cs) {
            he = cstart + cs;
        }
        ret = zero_subclusters(s, cstart, a, he);
        a = cstart + cs;
    }
    uint64_t tstart = b & ~(cs - 1);
    uint64_t wend = at_end ? (b + cs - 1) & ~(cs - 1) : tstart;
    if (ret == 0 && a < wend) {
        ret = set_entries(s, a >> s->cluster_bits, (wend - a) >> s->cluster_bits, SET_ZERO,
                          flags & VD_REQ_MAY_UNMAP);
    }
    if (ret == 0 && !at_end && (b & (cs - 1)) && tstart >= a) {
        ret = zero_subclusters(s, tstart, tstart, b); /* a partial last cluster */
    }
    return ret;
}

/*
 * One zero request as QEMU's qcow2 driver gets it from its block layer (qcow2_co_pwrite_zeroes):
 * [o, e) lies inside one zero unit unless both ends are unit-aligned (or e is the image's end).
 * A partial unit is zeroed whole in metadata when the rest of it reads as zeroes through the
 * chain and it holds no data of its own; otherwise -ENOTSUP (the caller writes the zeroes).
 */
static int zero_request(Qcow2State *s, uint64_t o, uint64_t e, int flags)
{
    uint64_t unit = s->extl2 ? s->sc_size : s->cluster_size;
    uint64_t head = o & (unit - 1);
    uint64_t tail = e >= s->h.size ? 0 : ((e + unit - 1) & ~(unit - 1)) - e;
    if (head || tail) {
        bool z1, z2 = false;
        int ret = chain_reads_zero(s, o - head, head, &z1);
        if (ret == 0 && z1) {
            ret = chain_reads_zero(s, e, tail, &z2);
        }
        if (ret < 0 || !z2) {
            return ret < 0 ? ret : -ENOTSUP;
        }
        o -= head;
        e = o + unit;
        Q2Extent x;
        ret = q2_get_extent(s, o, unit, false, &x);
        if (ret < 0) {
            return ret;
        }
        if (x.type != QCOW2_CLUSTER_UNALLOCATED && x.type != QCOW2_CLUSTER_ZERO_PLAIN &&
            x.type != QCOW2_CLUSTER_ZERO_ALLOC) {
            return -ENOTSUP;
        }
    }
    return zeroize(s, o, e, flags);
}

/*
 * Write-zeroes, cut into requests as QEMU's block layer cuts them for qcow2 (a partial unit at
 * either end on its own; the unit is the subcluster with extended L2, else the cluster), each
 * zeroed in metadata where QEMU's qcow2 does, else written as zeroes, so that the image's
 * allocation (qemu-img map) equals QEMU's for the same requests.
 */
int q2_zero(Qcow2State *s, uint64_t offset, uint64_t bytes, int flags)
{
    uint64_t unit = s->extl2 ? s->sc_size : s->cluster_size;
    uint64_t end = offset + bytes;
    while (offset < end) {
        uint64_t pe = end;
        if (offset & (unit - 1)) {
            uint64_t next = (offset | (unit - 1)) + 1;
            pe = next < end ? next : end;
        } else if ((end & (unit - 1)) && end - offset > unit) {
            pe = end & ~(unit - 1);
        }
        int ret = zero_request(s, offset, pe, flags);
        if (ret == -ENOTSUP && !(flags & VD_REQ_NO_FALLBACK)) {
            ret = write_zero_bytes(s, offset, pe - offset);
        }
        if (ret < 0) {
            return ret;
        }
        offset = pe;
    }
    return 0;
}

int q2_discard(Qcow2State *s, uint64_t offset, uint64_t bytes, int flags)
{
    uint64_t cs = s->cluster_size;
    uint64_t end = offset + bytes;
    uint64_t a = (offset + cs - 1) & ~(cs - 1);
    uint64_t b = end >= s->h.size ? (end + cs - 1) & ~(cs - 1) : end & ~(cs - 1);
    if (a >= b) {
        return 0;
    }
    uint64_t first = a >> s->cluster_bits, count = (b - a) >> s->cluster_bits;
    if (s->h.version < 3 && s->bs->backing && !(flags & VD_REQ_FULL_DISCARD)) {
        return 0; /* v2 cannot hide backing data: discarding would expose it (as QEMU) */
    }
    if ((flags & VD_REQ_FULL_DISCARD) || s->h.version < 3) {
        return set_entries(s, first, count, SET_UNALLOC, true);
    }
    if (s->bs->backing || s->has_data_file) {
        /* a data file's discarded clusters read zero, as QEMU marks them (and data file raw) */
        return set_entries(s, first, count, SET_ZERO, true);
    }
    /* no backing: unallocated reads as zeroes, so just drop allocations */
    return set_entries(s, first, count, SET_UNALLOC, true);
}