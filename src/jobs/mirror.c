/*
 * mirror.c - live block copy (drive-mirror / blockdev-mirror) through a "mirror-top" filter node.
 * Promises: once READY every byte the guest reads from the source reads the same from the target;
 * a copy of old data never lands after a newer guest write; the pivot is atomic for the guest.
 * Locking: m->lock (bitmap, mode flags) is a leaf below the job mutex; see "Mechanism" below.
 */
#include "jobs/mirror.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "block/chain.h"
#include "block/claims.h"
#include "block/graph.h"
#include "block/tracking.h"
#include "block/users.h"
#include "block/write-hooks.h"
#include "jobs/copy.h"
#include "jobs/journal.h"
#include "util/lock.h"
#include "util/log.h"

/*
 * Mechanism. Every export serving the source is switched (under drain) to the filter (so the pivot
 * can swap it for the target), and the job hooks every write to the source, whoever issues it
 * (block/write-hooks.h: the exports through the filter, an export or node added later, another
 * job): it goes to the source and then either synchronously to the target (write-blocking) or into
 * a dirty bitmap (background). The job thread picks dirty ranges and the copy engine (copy.c: a few
 * workers, 1 MiB copies, never two in flight sharing an aligned block) copies them source -> target,
 * each holding its range in the job's tracker, where the hook holds each write's range exclusively,
 * so a write to that range either finished before the copy read it, or starts after the copy and
 * re-dirties the range. While the copy runs, the target's in-memory backing is
 * the source itself, so a partial-cluster write into the target copies the rest of the cluster from
 * the source (complete, current data); at the pivot it becomes base. Pivot (block-job-complete):
 * the job thread copies what is dirty and flushes the target while guests still run (also before
 * READY, as QEMU does); then, on the QMP thread: drain exports, copy the (small) dirty tail, flush
 * the target's own layers only if that tail wrote anything (never the source, its temporary
 * backing), set its backing to base, swap every export from the filter (and any added on the source
 * since) to the target, repoint the nodes over the source (a raw node added over it) at the target,
 * resume. Every writer is drained there, not only the filter's: the exports of any node above the
 * source too, so no write races the tail or reaches the old source after the pivot. So
 * the guest's pause holds no sync when the guest was idle, and at most a sync of the tail otherwise.
 * Durability: every copy the job writes to the target bumps target_gen; a flush records the
 * generation it covers, so a copy is always flushed before the pivot. Write-blocking guest writes
 * to the target are the guest's own: a guest flush reaches the target through top_flush.
 * If guest writes outpace the background copy for a few seconds the job switches itself to
 * write-blocking (query-block-jobs "vdisk-copy-mode").
 * Resumable (vdiskd --state-dir, docs/resumable.md): a journal marks each segment a guest write
 * touches before the write reaches the source, and the job clears a segment only after a target
 * flush covered its copies; a job re-created from its journal starts PAUSED and, once resumed,
 * compares the marked segments and copies what differs.
 */

#define DEFAULT_BUF_SIZE (16ULL << 20)
#define IDLE_WAIT_NS 100000000ULL   /* re-check for new dirty data at least every 100 ms */
#define WINDOW_NS 1000000000ULL     /* write-rate vs copy-rate measurement window */
#define OUTPACED_WINDOWS 3          /* consecutive windows before switching to write-blocking */
#define COMPLETE_ROUNDS 4           /* copy+flush rounds before the drained pivot, at most */
#define MIRROR_QUICK_TAIL (4ULL << 20) /* ... only while more than this is dirty after one */
#define JOURNAL_CLEAR_NS 1000000000ULL /* clear the journal's in-sync segments about every second */

typedef struct Mirror Mirror;

/* The filter node's state: the way back to the job for a guest's flush (NULL once detached). */
typedef struct MirrorTop {
    Mirror *m;
} MirrorTop;

struct Mirror {
    Job *job;
    BlockNode *source, *target, *base; /* refs (base may be NULL) */
    bool base_is_source;
    BlockNode *filter;                 /* ref */
    BlockNode *target_orig_backing;    /* ref: restored when there is no pivot */
    BlockNode *final_backing;          /* the target's backing once done (no ref: base or orig) */
    bool shares_base;                  /* final_backing reads like base: base's data is skipped */
    bool backing_unseen;               /* vouched for, or named by the target's header, but not
                                        * opened: what it reads is unknown, maybe not zero */
    bool target_holds_base;            /* shares_base on a target without layers (NBD export,
                                        * raw): where the source reads base, its data is base's */
    bool target_new;
    BlockTracker *tracker;             /* the job's: its write hook and its copies */
    BlockTracker *guest_tracker;       /* the filter's (its exports'): guest-priority pacing */
    uint64_t len, granularity, chunk, tracker_granularity;
    uint64_t align;                    /* copies in flight never share an aligned block */
    CopyEngine *engine;                /* the copy workers (created with the job) */
    bool unmap;                        /* drive-mirror unmap: zeroes may unmap the target */
    bool rewrite_backing, skip_target_allocated;
    char *backing_name, *backing_fmt;
    JobErrorAction on_source_error, on_target_error;

    pthread_mutex_t lock;  /* guards everything below; never held while calling job_* or vd_* */
    pthread_cond_t cond;
    uint64_t *bitmap;      /* 1 bit per granularity chunk: differs (or may differ) from target */
    uint64_t nbits, dirty_bits;
    bool kicked;
    bool write_blocking;   /* effective copy mode */
    bool auto_write_blocking; /* switched because guest writes outpaced the copy */
    bool should_complete;
    bool detached;         /* filter no longer in front of the source */
    bool pivoted;
    bool drop_target;      /* drive-mirror registered the target: unregister it unless pivoted */
    int pending_target_error; /* from a write-blocking guest write: handled by the job thread */
    uint64_t stop_epoch;      /* bumped each time the job resumes from an error stop */

    /*
     * Copies written to the target (atomic; bumped after each write completed) and the value the
     * last successful flush covered (read before it started). Only the job thread, then prepare
     * on the QMP thread once run returned, flush: flushed_gen needs no lock.
     */
    uint64_t target_gen;
    uint64_t flushed_gen;
    /*
     * The same for write-blocking guest writes to the target, counted only for the journal's
     * clears (job thread): the job's own flushes must not sync after each guest write.
     */
    uint64_t guest_gen, guest_flushed_gen;
    /* Guest writes that reached the source, and the value its last journal flush covered. */
    uint64_t source_gen, source_flushed_gen;

    /*
     * Progress report (query-block-jobs): bytes copied by the job (atomic) and bytes guest writes
     * made dirty (m->lock); rates sampled by job_rates_sample (jobs/job.h).
     */
    uint64_t copied_total, dirtied_total;
    JobRates rates;
    bool verify;           /* x-verify: compare source and target before finishing */
    JobJournal *journal;   /* progress on disk (NULL: no --state-dir); the job thread clears */
    bool resumed;          /* re-created from a journal after a restart */
    int hook_error;        /* the source's write hook could not be added (the job fails) */
    uint64_t journal_t;    /* last clear (job thread) */
};

/* ---- nodes in use by a mirror: its source, target and filter (block/claims.h) ---- */

static int busy_claim(Mirror *m, const char *job_id, VdError **errp)
{
    BlockNode *const nodes[] = {m->source, m->target, m->filter};
    return vd_claim_nodes(m, "mirror", nodes, 3, errp);
}

static void busy_release(Mirror *m)
{
    vd_release_claims(m);
}

/* ---- dirty bitmap (m->lock held) ---- */

/* Returns how many chunks changed state. */
static uint64_t bm_set(Mirror *m, uint64_t offset, uint64_t bytes, bool dirty)
{
    uint64_t changed = 0;
    if (bytes == 0 || offset >= m->len) {
        return 0;
    }
    uint64_t first = offset / m->granularity;
    uint64_t last = (offset + bytes - 1) / m->granularity;
    if (last >= m->nbits) {
        last = m->nbits - 1;
    }
    for (uint64_t i = first; i <= last; i++) {
        uint64_t bit = 1ULL << (i % 64);
        bool was = m->bitmap[i / 64] & bit;
        if (dirty && !was) {
            m->bitmap[i / 64] |= bit;
            m->dirty_bits++;
            changed++;
        } else if (!dirty && was) {
            m->bitmap[i / 64] &= ~bit;
            m->dirty_bits--;
            changed++;
        }
    }
    return changed;
}

static bool bm_get(Mirror *m, uint64_t i)
{
    return m->bitmap[i / 64] & (1ULL << (i % 64));
}

/* First dirty bit in [lo, hi); false if none. */
static bool bm_find(Mirror *m, uint64_t lo, uint64_t hi, uint64_t *out)
{
    for (uint64_t i = lo; i < hi; i = (i / 64 + 1) * 64) {
        uint64_t w = m->bitmap[i / 64] >> (i % 64);
        if (w) {
            *out = i + (uint64_t)__builtin_ctzll(w);
            return *out < hi;
        }
    }
    return false;
}

/*
 * First dirty bit at or after `from` (wrapping once); false if none. The two halves are searched
 * separately: stepping word by word across the wrap of a bitmap whose length is not a multiple of
 * 64 skipped the bits at the start of word 0, and the copy loop then spun forever on them.
 */
static bool bm_next(Mirror *m, uint64_t from, uint64_t *out)
{
    if (m->dirty_bits == 0) {
        return false;
    }
    from = from < m->nbits ? from : 0;
    return bm_find(m, from, m->nbits, out) || bm_find(m, 0, from, out);
}

static uint64_t dirty_bytes_locked(Mirror *m)
{
    uint64_t b = m->dirty_bits * m->granularity;
    return b > m->len ? m->len : b;
}

/* Are a and b the same image (one file opened twice, e.g. by two blockdev-adds)? */
static bool same_image(BlockNode *a, BlockNode *b)
{
    if (a == b) {
        return true;
    }
    if (!a || !b || strcmp(a->drv->name, b->drv->name) != 0) {
        return false;
    }
    char *pa = realpath(a->filename, NULL), *pb = realpath(b->filename, NULL);
    bool same = pa && pb && !strcmp(pa, pb);
    free(pa);
    free(pb);
    return same;
}

/* ---- writes to the source, whoever issues them (the source's write hook, holding its range) ---- */

typedef enum { W_DATA, W_ZERO, W_DISCARD } WriteKind;

static void mirror_kick_locked(Mirror *m)
{
    m->kicked = true;
    vd_cond_broadcast(&m->cond);
}

static void mirror_on_write(Mirror *m, WriteKind kind, uint64_t offset, uint64_t bytes,
                            const void *buf, int flags)
{
    vd_mutex_lock(&m->lock);
    bool detached = m->detached, wb = m->write_blocking;
    vd_mutex_unlock(&m->lock);
    if (detached) {
        return;
    }
    /*
     * A target write issued while the job is stopped, or before a resume from an error stop,
     * belongs to the episode the stop already reported: remember which one it was issued in.
     */
    JobStatus st0 = job_status(m->job);
    bool stopped_at_issue = st0 == JOB_STATUS_PAUSED || st0 == JOB_STATUS_STANDBY;
    uint64_t epoch = __atomic_load_n(&m->stop_epoch, __ATOMIC_ACQUIRE);
    int r = -EAGAIN;
    if (wb && kind == W_DATA) {
        r = vd_pwrite(m->target, offset, bytes, buf, flags & VD_REQ_FUA);
    } else if (wb && kind == W_ZERO) {
        r = vd_pwrite_zeroes(m->target, offset, bytes,
                             flags & (VD_REQ_FUA | (m->unmap ? VD_REQ_MAY_UNMAP : 0)));
    }
    if (r != -EAGAIN) {
        __atomic_add_fetch(&m->guest_gen, 1, __ATOMIC_SEQ_CST); /* a journal clear flushes it */
    }
    /*
     * The guest's write to the source succeeded; a failed target write only leaves the range
     * dirty. While the job is stopped (e.g. paused on an earlier target error) that is all: the
     * copy loop re-copies it after resume, and the stop already reported the target's failure.
     */
    bool stopped = stopped_at_issue;
    if (r < 0 && r != -EAGAIN) {
        JobStatus st = job_status(m->job);
        stopped = stopped || st == JOB_STATUS_PAUSED || st == JOB_STATUS_STANDBY ||
                  epoch != __atomic_load_n(&m->stop_epoch, __ATOMIC_ACQUIRE);
    }
    vd_mutex_lock(&m->lock);
    if (r < 0) {
        /* Background mode, a discard, or a failed target write: the copy loop takes it from here. */
        m->dirtied_total += bm_set(m, offset, bytes, true) * m->granularity;
        if (r != -EAGAIN && !stopped && !m->pending_target_error) {
            m->pending_target_error = r;
        }
        mirror_kick_locked(m);
    }
    vd_mutex_unlock(&m->lock);
}

static Mirror *top_mirror(BlockNode *bs)
{
    return __atomic_load_n(&((MirrorTop *)bs->opaque)->m, __ATOMIC_ACQUIRE);
}

/*
 * Any write to the source (block/write-hooks.h): through the filter (the exports), an export or a
 * node added later, another job. The journal marks its segments before the source sees it (so
 * after a crash it is in the target or marked), then the source, then the mirror's share; the hook
 * holds the range in m->tracker throughout, where the job's copies hold it shared.
 */
static void source_before_write(void *opaque, const VdWriteReq *w)
{
    Mirror *m = opaque;
    job_journal_write_begin(m->journal, w->offset, w->bytes);
}

static void source_after_write(void *opaque, const VdWriteReq *w, int ret)
{
    Mirror *m = opaque;
    if (ret == 0) {
        __atomic_add_fetch(&m->source_gen, 1, __ATOMIC_SEQ_CST);
        /* A discarded range reads what the source decides: it is re-copied like a write. An
         * offloaded copy (no buffer) is re-copied too. */
        WriteKind kind = w->kind == VD_WRITE_ZEROES ? W_ZERO
                       : w->kind == VD_WRITE_DATA && w->buf ? W_DATA : W_DISCARD;
        mirror_on_write(m, kind, w->offset, w->bytes, w->buf, w->flags);
    }
    job_journal_write_end(m->journal, w->offset, w->bytes);
}

static int top_flush(BlockNode *bs)
{
    /*
     * vd_flush then flushes the source (our backing); write-blocking data is on the target too.
     * The target's own layers only: its temporary backing is the source, flushed anyway.
     */
    Mirror *m = top_mirror(bs);
    if (m) {
        vd_mutex_lock(&m->lock);
        bool wb = m->write_blocking && !m->detached;
        vd_mutex_unlock(&m->lock);
        if (wb) {
            return vd_flush_own(m->target);
        }
    }
    return 0;
}

static const BlockDriver mirror_top_driver = {
    .name = "mirror-top",
    .supports_backing = true,
    .state_size = sizeof(MirrorTop),
    .pread = vd_filter_pread,
    .pwrite = vd_filter_pwrite,
    .pwrite_zeroes = vd_filter_pwrite_zeroes,
    .pdiscard = vd_filter_pdiscard,
    .flush = top_flush,
    .block_status = vd_filter_block_status,
    .getlength = vd_filter_getlength,
    .cluster_size = vd_filter_cluster_size,
};

/* A node of mirror_top_driver over source, named node_name or "#mirror-top-<job>". */
static BlockNode *filter_new(Mirror *m, const char *job_id, const char *node_name)
{
    char *generated = NULL;
    if (!node_name && asprintf(&generated, "#mirror-top-%s", job_id) < 0) {
        return NULL;
    }
    BlockNode *bs = vd_filter_new(&mirror_top_driver, m->source, node_name ? node_name : generated);
    free(generated);
    if (bs) {
        ((MirrorTop *)bs->opaque)->m = m;
    }
    return bs;
}

/* ---- the node's users (NBD exports; block/users.h) ---- */

/* Drain every user of `from` (NULL on ENOMEM: nothing drained). */
static VdDrainedUsers *exports_drain(Mirror *m, BlockNode *from)
{
    VdDrainedUsers *set = calloc(1, sizeof(*set));
    if (set && vd_node_users_drain(from, set) < 0) {
        free(set);
        return NULL;
    }
    return set;
}

/* Point them at `to` (NULL: keep their node) and resume them; set NULL: nothing was drained. */
static void exports_set_node_and_resume(Mirror *m, VdDrainedUsers *set, BlockNode *to)
{
    if (set) {
        vd_node_users_resume(set, to);
        free(set);
    }
}

/*
 * Every way a write reaches the source from outside, drained for the pivot or the abort: the exports
 * on the filter (the guests), and (graph_drain_writers) exports added on the source itself since
 * the start and the exports of every node above the source (a raw node over it, their parents).
 */
typedef struct MirrorDrained {
    VdDrainedUsers filter;
    GraphDrained rest;
} MirrorDrained;

/* Resume them: the filter's users on `guests`, the source's on `source_users` (NULL: keep). */
static void drained_resume(MirrorDrained *d, BlockNode *guests, BlockNode *source_users)
{
    graph_resume_writers(&d->rest, source_users);
    vd_node_users_resume(&d->filter, guests);
    free(d);
}

/* NULL on ENOMEM: nothing drained. */
static MirrorDrained *drain_every_writer(Mirror *m)
{
    MirrorDrained *d = calloc(1, sizeof(*d));
    if (!d || vd_node_users_drain(m->filter, &d->filter) < 0) {
        free(d);
        return NULL;
    }
    /* The filter's own users are drained already (it is above the source when registered). */
    if (graph_drain_writers(m->source, m->filter, &d->rest) < 0) {
        vd_node_users_resume(&d->filter, NULL);
        free(d);
        return NULL;
    }
    return d;
}

/* ---- copying ---- */

/*
 * Does [offset, offset+bytes) of the target read zeroes once it has its final backing? *pnum gets
 * the length of the first extent with one answer. Only the target's own layer is consulted: during
 * the copy its in-memory backing is the source.
 */
static int target_reads_zero(Mirror *m, uint64_t offset, uint64_t bytes, uint64_t *pnum, bool *zero,
                             bool *allocated)
{
    uint64_t n = bytes, map = 0;
    BlockNode *file = NULL;
    int flags = 0;
    if (m->target->drv->block_status) {
        flags = m->target->drv->block_status(m->target, offset, bytes, &n, &map, &file);
        if (flags < 0) {
            return flags;
        }
    } else {
        flags = VD_BS_DATA | VD_BS_ALLOCATED;
    }
    if (n == 0 || n > bytes) {
        n = bytes;
    }
    bool alloc = (flags & (VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_ZERO)) ||
                 !m->target->drv->supports_backing;
    *allocated = alloc && !(!m->target->drv->supports_backing && (flags & VD_BS_ZERO));
    if (alloc) {
        *zero = (flags & VD_BS_ZERO) != 0;
    } else if (m->final_backing) {
        /* unallocated: reads the final backing (zeroes past its end) */
        int64_t fblen = vd_getlength(m->final_backing);
        if (fblen < 0) {
            return (int)fblen;
        }
        *zero = offset >= (uint64_t)fblen;
        if (!*zero) {
            uint64_t fn = 0;
            VdBlockStatus st = {0};
            n = n < (uint64_t)fblen - offset ? n : (uint64_t)fblen - offset;
            int r = vd_block_status_above(m->final_backing, NULL, offset, n, &fn, &st);
            if (r < 0) {
                return r;
            }
            n = fn && fn < n ? fn : n;
            *zero = (st.flags & VD_BS_ZERO) || !(st.flags & VD_BS_ALLOCATED);
        }
    } else {
        /* no backing: zeroes - unless the caller vouched (x-backing-matches) that below the
         * target lies what base holds */
        *zero = !m->backing_unseen;
    }
    *pnum = n;
    return 0;
}

/* A copy of ours reached the target (or may have, on error): the next flush must cover it. */
static void target_written(Mirror *m)
{
    __atomic_add_fetch(&m->target_gen, 1, __ATOMIC_SEQ_CST);
}

/*
 * Make every copy written to the target so far durable: the target's own layers (format + file),
 * never its backing (the source during the copy, base after). A no-op when nothing was copied
 * since the last successful flush.
 */
static int mirror_flush_target(Mirror *m)
{
    uint64_t gen = __atomic_load_n(&m->target_gen, __ATOMIC_SEQ_CST);
    if (gen == m->flushed_gen) {
        return 0;
    }
    int r = vd_flush_own(m->target);
    if (r == 0) {
        m->flushed_gen = gen;
    }
    return r;
}

/* mirror_flush_target, also covering write-blocking guest writes (the journal's clears). */
static int mirror_flush_target_all(Mirror *m)
{
    uint64_t guest = __atomic_load_n(&m->guest_gen, __ATOMIC_SEQ_CST);
    if (guest == m->guest_flushed_gen) {
        return mirror_flush_target(m);
    }
    uint64_t gen = __atomic_load_n(&m->target_gen, __ATOMIC_SEQ_CST);
    int r = vd_flush_own(m->target);
    if (r == 0) {
        m->flushed_gen = gen;
        m->guest_flushed_gen = guest;
    }
    return r;
}

static int copy_data(Mirror *m, BlockNode *from, uint64_t offset, uint64_t bytes, uint8_t *buf,
                     bool *is_read)
{
    while (bytes > 0) {
        uint64_t n = bytes < m->chunk ? bytes : m->chunk;
        *is_read = true;
        int r = vd_pread(from, offset, n, buf);
        if (r < 0) {
            return r;
        }
        *is_read = false;
        r = vd_pwrite(m->target, offset, n, buf, 0);
        target_written(m);
        if (r < 0) {
            return r;
        }
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int target_final_pread(Mirror *m, uint64_t off, uint64_t n, uint8_t *buf);

/*
 * The source's allocation says nothing about what the target's final backing holds: a copy with
 * no base in the source's chain (a raw or NBD source, sync=full) onto a target that keeps a
 * backing of its own. There every unit the source reads is compared with what the target reads
 * on its own (its layer, else that backing) and only a unit that differs is written - the source
 * text's third case: "compare the read data with the data in base to decide if a copy is needed".
 */
static bool compare_with_final_backing(const Mirror *m)
{
    return m->base == NULL && m->final_backing != NULL;
}

/* copy_data where compare_with_final_backing: write only the granularity units that differ. */
static int copy_differing(Mirror *m, BlockNode *from, uint64_t offset, uint64_t bytes,
                          uint8_t *buf, bool *is_read)
{
    uint8_t *cmp = malloc(m->chunk);
    int r = cmp ? 0 : -ENOMEM;
    *is_read = false;
    while (r == 0 && bytes > 0) {
        uint64_t n = bytes < m->chunk ? bytes : m->chunk;
        *is_read = true;
        if ((r = vd_pread(from, offset, n, buf)) < 0) {
            break;
        }
        *is_read = false;
        if ((r = target_final_pread(m, offset, n, cmp)) < 0) {
            break;
        }
        for (uint64_t pos = 0; r == 0 && pos < n;) {
            uint64_t unit = m->granularity - (offset + pos) % m->granularity;
            unit = unit < n - pos ? unit : n - pos;
            uint64_t run = 0; /* units that differ, written at once */
            while (pos + run < n && memcmp(buf + pos + run, cmp + pos + run, unit) != 0) {
                run += unit;
                unit = m->granularity < n - pos - run ? m->granularity : n - pos - run;
            }
            if (run) {
                r = vd_pwrite(m->target, offset + pos, run, buf + pos, 0);
                target_written(m);
                pos += run;
            } else {
                pos += unit;
            }
        }
        offset += n;
        bytes -= n;
    }
    free(cmp);
    return r;
}

/*
 * Make the target's [offset, offset+bytes) read what the source reads, for the content above base;
 * what the source takes from base (and the target will too) is skipped, zeroes stay sparse.
 * The caller holds the range (the job's tracker) or has drained every writer.
 */
static int mirror_copy_range(Mirror *m, uint64_t offset, uint64_t bytes, uint8_t *buf,
                             bool *is_read)
{
    uint64_t end = offset + bytes;
    while (offset < end) {
        uint64_t pnum = 0;
        VdBlockStatus st;
        *is_read = true;
        int r;
        if (m->base_is_source) {
            /* sync=none: every dirty range is data the guest wrote after the start. */
            st.flags = VD_BS_ALLOCATED | VD_BS_DATA;
            pnum = end - offset;
        } else if ((r = vd_block_status_above(m->source, m->base, offset, end - offset, &pnum,
                                              &st)) < 0) {
            return r;
        }
        if (pnum == 0 || pnum > end - offset) {
            pnum = end - offset;
        }
        bool src_zero = (st.flags & VD_BS_ZERO) ||
                        (!(st.flags & VD_BS_ALLOCATED) && m->base == NULL);
        if ((st.flags & VD_BS_ALLOCATED) && !src_zero) {
            BlockNode *from = m->base_is_source ? m->source
                                                : copy_read_layer(m->source, st.layer, offset, pnum);
            r = compare_with_final_backing(m) ? copy_differing(m, from, offset, pnum, buf, is_read)
                                              : copy_data(m, from, offset, pnum, buf, is_read);
            if (r < 0) {
                return r;
            }
        } else {
            /* Source reads zero, or (unallocated above base) reads base: check the target. */
            for (uint64_t pos = offset; pos < offset + pnum;) {
                uint64_t tn;
                bool tzero, talloc;
                *is_read = false;
                if (target_reads_zero(m, pos, offset + pnum - pos, &tn, &tzero, &talloc) < 0) {
                    /* Unknown target status (an optimisation): write what the source reads. */
                    tn = offset + pnum - pos;
                    tzero = false;
                    talloc = true;
                }
                if (src_zero && !tzero) {
                    r = vd_pwrite_zeroes(m->target, pos, tn, m->unmap ? VD_REQ_MAY_UNMAP : 0);
                    target_written(m);
                } else if (!src_zero && talloc && !m->target_holds_base) {
                    /* The target holds its own data where the source shows base: copy base. */
                    r = copy_data(m, m->source, pos, tn, buf, is_read);
                } else {
                    r = 0;
                }
                if (r < 0) {
                    return r;
                }
                pos += tn;
            }
        }
        offset += pnum;
    }
    return 0;
}

/* Initial dirty bitmap: what the source decides above base, plus/minus target allocations. */
static int mirror_scan(Mirror *m)
{
    if (m->base_is_source) {
        return 0;
    }
    for (uint64_t off = 0; off < m->len;) {
        if (job_is_cancelled(m->job)) {
            return -ECANCELED;
        }
        uint64_t pnum = 0;
        VdBlockStatus st;
        int r = vd_block_status_above(m->source, m->base, off, m->len - off, &pnum, &st);
        if (r < 0) {
            return r;
        }
        if (pnum == 0) {
            pnum = m->len - off;
        }
        /* A target that will not share the source's base must get every byte. */
        bool src_needs = (st.flags & VD_BS_ALLOCATED) != 0 || !m->shares_base;
        for (uint64_t pos = off; pos < off + pnum;) {
            uint64_t tn = off + pnum - pos;
            bool tzero = true, talloc = false;
            if ((!m->target_new || m->skip_target_allocated) &&
                target_reads_zero(m, pos, tn, &tn, &tzero, &talloc) < 0) {
                /*
                 * The target's block status is an optimisation: when it fails, assume the
                 * least (the target may hold anything there) and copy every byte the source
                 * decides; a real target failure shows up on the copy's writes.
                 */
                tn = off + pnum - pos;
                tzero = false;
                talloc = !m->skip_target_allocated;
            }
            /* A layerless target vouched for by x-backing-matches holds base's data already. */
            talloc = talloc && !(m->target_holds_base && !src_needs);
            bool dirty = m->skip_target_allocated ? (src_needs && !talloc)
                                                  : (src_needs || talloc);
            if (dirty) {
                vd_mutex_lock(&m->lock);
                bm_set(m, pos, tn, true);
                vd_mutex_unlock(&m->lock);
            }
            pos += tn;
        }
        off += pnum;
    }
    return 0;
}

static void mirror_update_progress(Mirror *m, bool ready)
{
    vd_mutex_lock(&m->lock);
    uint64_t rem = dirty_bytes_locked(m);
    vd_mutex_unlock(&m->lock);
    /* libvirt reads offset == len as "ready": never show it before READY. */
    job_progress_set_remaining(m->job, (!ready && rem == 0) ? 1 : rem);
}

/* An I/O error of the copy: returns 0 to carry on (retry later) or the error to fail with. */
static int mirror_io_error(Mirror *m, int r, bool is_read, VdError **errp)
{
    JobErrorAction a = job_handle_io_error(m->job, is_read ? m->on_source_error : m->on_target_error,
                                           is_read, r);
    if (a == JOB_ERR_REPORT) {
        vd_error_setg(errp, -r, "Mirror %s error: %s", is_read ? "read" : "write", strerror(-r));
        return r;
    }
    if (a == JOB_ERR_STOP) {
        job_pause_point(m->job);
        /*
         * Resumed: target errors recorded by guest writes while we were stopped (their ranges are
         * dirty, so they are re-copied) are stale: the user resumed because the target is fixed.
         */
        vd_mutex_lock(&m->lock);
        __atomic_add_fetch(&m->stop_epoch, 1, __ATOMIC_RELEASE);
        m->pending_target_error = 0;
        vd_mutex_unlock(&m->lock);
    } else {
        job_sleep_ns(m->job, 10000000); /* ignore: retry, but do not spin */
    }
    return 0;
}

/* ---- the copy loop: the coordinator (job thread) picks dirty ranges, the engine copies them ---- */

/* One chunk, on a copy worker. Tracked (run): the range is held; clear its bits only now. */
static void mirror_copy_chunk(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size)
{
    Mirror *m = opaque;
    JobJournal *j = c->tracked ? m->journal : NULL; /* (prepare's tail needs no bookkeeping) */
    job_journal_copy_begin(j, c->off, c->bytes);    /* before the range stops counting dirty */
    if (c->tracked) {
        vd_mutex_lock(&m->lock);
        bm_set(m, c->off, c->bytes, false);
        vd_mutex_unlock(&m->lock);
    }
    c->ret = mirror_copy_range(m, c->off, c->bytes, buf, &c->is_read);
    if (c->ret == 0) {
        __atomic_add_fetch(&m->copied_total, c->bytes, __ATOMIC_RELAXED);
    }
    if (c->ret < 0 && c->tracked) {
        /* A failed chunk goes back to dirty: retried after the error policy's stop/ignore. */
        vd_mutex_lock(&m->lock);
        bm_set(m, c->off, c->bytes, true);
        vd_mutex_unlock(&m->lock);
    }
    job_journal_copy_end(j, c->off, c->bytes);
    c->copied = c->bytes;
}

/*
 * The next dirty range at or after *cursor (wrapping) that overlaps no copy in flight, at most
 * max_bytes, starting on an `a` boundary (the engine's alignment, or the granularity when only
 * one copy may be in flight). False when there is none right now.
 */
static bool mirror_pick(Mirror *m, uint64_t *cursor, uint64_t max_bytes, uint64_t a, uint64_t *off,
                        uint64_t *n)
{
    uint64_t g = m->granularity, from = *cursor;
    unsigned tries = copy_engine_max_in_flight(m->engine) + 2;
    bool found = false;
    vd_mutex_lock(&m->lock);
    for (unsigned t = 0; t < tries && !found; t++) {
        uint64_t first;
        if (!bm_next(m, from >= m->nbits ? 0 : from, &first)) {
            break;
        }
        uint64_t start = first * g / a * a;
        uint64_t limit = start + max_bytes;
        limit = limit < (first + 1) * g ? (first + 1) * g : limit;
        uint64_t last = first;
        while (last + 1 < m->nbits && (last + 2) * g <= limit && bm_get(m, last + 1)) {
            last++;
        }
        uint64_t end = ((last + 1) * g + a - 1) / a * a;
        end = end > limit ? limit : end;
        end = end > m->len ? m->len : end;
        uint64_t skip = 0;
        uint64_t e2 = copy_engine_clip(m->engine, start, end, &skip);
        if (e2 == 0) {
            from = skip / g;
            continue;
        }
        *off = start;
        *n = e2 - start;
        *cursor = e2 / g;
        found = true;
    }
    vd_mutex_unlock(&m->lock);
    return found;
}


typedef struct MirrorReap {
    Mirror *m;
    bool failed;           /* the first failure since the last quiet point */
    CopyChunk first_failure;
    uint64_t window_copied;
    uint64_t to_account;   /* bytes for the rate limiter (only while a speed is set) */
} MirrorReap;

static void mirror_reaped(void *opaque, const CopyChunk *c)
{
    MirrorReap *mr = opaque;
    if (c->ret < 0) {
        /* Its range is dirty again; only the first failure is reported (the others retry). */
        if (!mr->failed) {
            mr->failed = true;
            mr->first_failure = *c;
        }
        return;
    }
    mr->window_copied += c->bytes;
    job_progress_update(mr->m->job, c->bytes);
    mirror_update_progress(mr->m, job_is_ready(mr->m->job));
    if (job_get_speed(mr->m->job)) {
        mr->to_account += c->bytes;
    }
}

/*
 * What the target reads at [off, off+n) once it has its final backing (its own layer where it
 * decides, else the final backing, else zeroes): during the copy its in-memory backing is the
 * source, which would hide a range the copy missed.
 */
static int target_final_pread(Mirror *m, uint64_t off, uint64_t n, uint8_t *buf)
{
    while (n > 0) {
        uint64_t pnum = n;
        bool zero, alloc;
        int r = target_reads_zero(m, off, n, &pnum, &zero, &alloc);
        if (r < 0) {
            return r;
        }
        pnum = pnum ? pnum : n;
        BlockNode *fb = m->final_backing;
        int64_t fblen = fb ? vd_getlength(fb) : 0;
        if (alloc || zero) {
            r = alloc ? vd_pread(m->target, off, pnum, buf) : (memset(buf, 0, pnum), 0);
        } else if (fblen < 0) {
            r = (int)fblen;
        } else {
            uint64_t in = (uint64_t)fblen > off ? (uint64_t)fblen - off : 0;
            in = in < pnum ? in : pnum;
            memset(buf + in, 0, pnum - in);
            r = in ? vd_pread(fb, off, in, buf) : 0;
        }
        if (r < 0) {
            return r;
        }
        off += pnum;
        buf += pnum;
        n -= pnum;
    }
    return 0;
}

/*
 * x-verify: before the pivot (or the end of a soft cancel), compare every byte the guest reads
 * from the source with what the target will read on its own. Each unit holds the job's range
 * (BT_SHARED: guest writes to it wait) and first copies what is dirty in it, so the comparison is
 * exact; writes after a unit was checked are copied by the tail. Reads the whole disk twice.
 */
static int mirror_verify(Mirror *m, VdError **errp)
{
    uint64_t unit = m->chunk;
    uint8_t *a = malloc(unit), *b = malloc(unit);
    int r = a && b ? 0 : -ENOMEM;
    uint64_t bad = UINT64_MAX;
    for (uint64_t off = 0; r == 0 && off < m->len; off += unit) {
        if (job_is_cancelled(m->job)) {
            r = -ECANCELED;
            break;
        }
        uint64_t n = m->len - off < unit ? m->len - off : unit;
        BtRequest req;
        block_tracker_begin(m->tracker, &req, off, n, BT_SHARED);
        vd_mutex_lock(&m->lock);
        bool dirty = bm_set(m, off, n, false) > 0;
        vd_mutex_unlock(&m->lock);
        bool is_read = false;
        if (dirty && (r = mirror_copy_range(m, off, n, a, &is_read)) < 0) {
            vd_mutex_lock(&m->lock);
            bm_set(m, off, n, true);
            vd_mutex_unlock(&m->lock);
        }
        if (r == 0 && (r = vd_pread(m->source, off, n, a)) == 0) {
            r = target_final_pread(m, off, n, b);
        }
        block_tracker_end(m->tracker, &req);
        for (uint64_t i = 0; r == 0 && i < n && bad == UINT64_MAX; i++) {
            bad = a[i] != b[i] ? off + i : bad;
        }
        if (bad != UINT64_MAX) {
            break;
        }
    }
    free(a);
    free(b);
    if (bad != UINT64_MAX) {
        vd_error_setg(errp, EIO, "Verification failed: source and target differ at offset %llu; "
                      "not pivoting", (unsigned long long)bad);
        return -EIO;
    }
    if (r < 0 && r != -ECANCELED) {
        vd_error_setg(errp, -r, "Verification could not read: %s", strerror(-r));
    }
    return r == 0 ? mirror_flush_target(m) : r;
}

/* ---- progress on disk (jobs/journal.h) ---- */

/* Does the job still have work in [off, off+bytes)? (the journal's clear asks, job thread) */
static bool mirror_range_dirty(void *opaque, uint64_t off, uint64_t bytes)
{
    Mirror *m = opaque;
    uint64_t first = off / m->granularity, last = (off + bytes - 1) / m->granularity, hit;
    vd_mutex_lock(&m->lock);
    bool dirty = bm_find(m, first, last + 1 < m->nbits ? last + 1 : m->nbits, &hit);
    vd_mutex_unlock(&m->lock);
    return dirty;
}

/*
 * The source's side of a clear: guest writes it holds only in caches (an unflushed qcow2 L2
 * update) would be lost by a crash while their copy in the target survives, and the two would
 * differ in a segment the journal calls clean. So the guests' writes are made durable too.
 */
static int mirror_flush_source(Mirror *m)
{
    uint64_t gen = __atomic_load_n(&m->source_gen, __ATOMIC_SEQ_CST);
    if (gen == m->source_flushed_gen) {
        return 0;
    }
    int r = vd_flush(m->source);
    if (r == 0) {
        m->source_flushed_gen = gen;
    }
    return r;
}

/*
 * About once a second: the segments in sync with nothing in flight are cleared in the journal,
 * after flushes of the source and the target that cover every guest write and every copy into
 * them (a failed flush keeps them marked).
 */
static void mirror_journal_tick(Mirror *m)
{
    uint64_t t = job_now_ns();
    if (!m->journal || t - m->journal_t < JOURNAL_CLEAR_NS) {
        return;
    }
    m->journal_t = t;
    if (job_journal_clear_collect(m->journal, mirror_range_dirty, m) > 0 &&
        mirror_flush_source(m) == 0 && mirror_flush_target_all(m) == 0) {
        (void)job_journal_clear_commit(m->journal);
    }
}

/*
 * Resumed from a journal: compare its marked segments (the source as the guest reads it, the
 * target as it reads on its own) and mark dirty what differs. Guest writes meanwhile dirty their
 * own ranges (the hook is in place): this only adds bits.
 */
static int mirror_resume_read_target(void *opaque, uint64_t off, uint64_t bytes, uint8_t *buf)
{
    return target_final_pread(opaque, off, bytes, buf);
}

static void mirror_resume_differs(void *opaque, uint64_t off, uint64_t bytes)
{
    Mirror *m = opaque;
    vd_mutex_lock(&m->lock);
    bm_set(m, off, bytes, true);
    vd_mutex_unlock(&m->lock);
}

static int mirror_resume_scan(Mirror *m)
{
    JobJournalScan scan = {.job = m->job, .source = m->source, .dest = m->target,
                           .read_dest = mirror_resume_read_target,
                           .differs = mirror_resume_differs, .opaque = m, .unit = m->chunk,
                           .granularity = m->granularity};
    return job_journal_resume_scan(m->journal, &scan);
}

static int mirror_run(Job *job, VdError **errp)
{
    Mirror *m = job_opaque(job);
    CopyEngine *e = m->engine;
    /*
     * As QEMU's mirror_run: a target of another size fails the job before any copy, since a
     * pivot would change the size of the disk under the guest (or lose its tail).
     */
    if (m->hook_error < 0) {
        vd_error_setg(errp, -m->hook_error, "Cannot watch the writes to '%s': %s",
                      m->source->node_name, strerror(-m->hook_error));
        return m->hook_error;
    }
    int64_t tlen = vd_getlength(m->target);
    if (tlen != (int64_t)m->len) {
        vd_error_setg(errp, EINVAL, "Source and target image have different sizes");
        return -EINVAL;
    }
    if (m->resumed) {
        job_pause_point(job); /* re-created PAUSED: nothing runs before job-resume */
    }
    int r = m->resumed ? mirror_resume_scan(m) : mirror_scan(m);
    if (r < 0) {
        if (r != -ECANCELED) {
            vd_error_setg(errp, -r, "Cannot read the block status of the source: %s", strerror(-r));
        }
        return r;
    }
    mirror_update_progress(m, false);
    uint64_t cursor = 0, window_start = job_now_ns();
    MirrorReap mr = {.m = m};
    vd_mutex_lock(&m->lock);
    uint64_t window_dirty_start = m->dirty_bits;
    vd_mutex_unlock(&m->lock);
    int outpaced = 0, complete_rounds = 0;
    for (;;) {
        CopyChunk c;
        while (copy_engine_reap(e, &c, false)) {
            mirror_reaped(&mr, &c);
        }
        mirror_journal_tick(m);
        /*
         * Quiet points (nothing in flight), as between two copies of a serial loop: where the job
         * pauses, sees a cancel, handles an error or sleeps for the speed limit. A verb (kick), a
         * failure, a guest's target error or a speed limit drain the copies in flight first.
         */
        uint64_t speed = job_get_speed(job);
        vd_mutex_lock(&m->lock);
        bool terr_pending = m->pending_target_error != 0;
        vd_mutex_unlock(&m->lock);
        if (copy_engine_take_kick(e) || mr.failed || terr_pending || speed) {
            copy_engine_drain(e, mirror_reaped, &mr);
        }
        if (copy_engine_in_flight(e) == 0) {
            if (mr.to_account) {
                job_rate_limit(job, mr.to_account);
                mr.to_account = 0;
            }
            if (mr.failed) {
                mr.failed = false;
                if ((r = mirror_io_error(m, mr.first_failure.ret, mr.first_failure.is_read,
                                         errp)) < 0) {
                    break;
                }
                continue;
            }
            job_pause_point(job);
            if (job_is_cancelled(job)) {
                r = -ECANCELED;
                break;
            }
            vd_mutex_lock(&m->lock);
            int terr = m->pending_target_error;
            m->pending_target_error = 0;
            vd_mutex_unlock(&m->lock);
            if (terr && (r = mirror_io_error(m, terr, false, errp)) < 0) {
                break;
            }
        }

        /*
         * Are guest writes outpacing the copy? If a window's copying shrank the dirty set by less
         * than a tenth of what it copied, guests re-dirty as fast as we copy and the job may never
         * converge: stop accumulating, go write-blocking.
         */
        uint64_t t = job_now_ns();
        if (t - window_start >= WINDOW_NS) {
            vd_mutex_lock(&m->lock);
            uint64_t gained = window_dirty_start > m->dirty_bits
                                  ? (window_dirty_start - m->dirty_bits) * m->granularity : 0;
            bool stuck = m->dirty_bits > 0 && mr.window_copied > 0 &&
                         gained * 10 < mr.window_copied;
            outpaced = stuck ? outpaced + 1 : 0;
            if (outpaced >= OUTPACED_WINDOWS && !m->write_blocking) {
                m->write_blocking = m->auto_write_blocking = true;
                vd_log(VD_LOG_INFO, "mirror '%s': guest writes outpace the copy, switching to "
                       "write-blocking", job_id(job));
            }
            window_dirty_start = m->dirty_bits;
            vd_mutex_unlock(&m->lock);
            window_start = t;
            mr.window_copied = 0;
        }

        /*
         * Under a speed limit: one copy at a time of about one 100 ms slice (rate limit
         * fidelity, exactly the serial loop's behaviour). Unlimited: copy units of m->chunk
         * aligned to the engine's alignment, as many in flight as the engine has workers.
         */
        uint64_t chunk = m->chunk, a = m->align;
        unsigned max_in_flight = copy_engine_allowed(e);
        if (speed) {
            chunk = speed / 10 < chunk ? speed / 10 : chunk;
            chunk = chunk / m->granularity * m->granularity;
            chunk = chunk ? chunk : m->granularity;
            a = m->granularity;
            max_in_flight = 1;
        }
        unsigned in_flight = copy_engine_in_flight(e);
        uint64_t off = 0, n = 0;
        if (in_flight < max_in_flight && mirror_pick(m, &cursor, chunk, a, &off, &n)) {
            copy_engine_submit(e, off, n, true);
            continue;
        }
        if (in_flight > 0) {
            if (copy_engine_reap(e, &c, true)) {
                mirror_reaped(&mr, &c);
            }
            continue;
        }

        /* Nothing in flight and nothing dirty. */
        bool ready = job_is_ready(job);
        vd_mutex_lock(&m->lock);
        bool done = m->should_complete;
        bool have = m->dirty_bits > 0;
        vd_mutex_unlock(&m->lock);
        if (have) {
            continue; /* dirtied since the pick */
        }
        done = ready && (done || job_cancel_requested(job));
        if (!ready || done) {
            /*
             * In sync: make the copies durable now, while guests run (QEMU flushes before
             * READY too), so the drained pivot only flushes the tail it copies itself.
             */
            int fr = mirror_flush_target(m);
            if (fr < 0 && done) {
                r = 0; /* prepare flushes again and fails the job with this error */
                break;
            }
            if (fr < 0) {
                if ((r = mirror_io_error(m, fr, false, errp)) < 0) {
                    break;
                }
                continue;
            }
        }
        if (!ready) {
            job_transition_to_ready(job);
            continue;
        }
        if (done) {
            /*
             * Writes that came during the flush are copied and flushed here too, a few
             * rounds at most; the rest is the pivot's tail. From the second round on, guest
             * writes go to the target as well (write-blocking): the dirty set then only
             * shrinks, so this converges even under a guest writing faster than the copy.
             * Not before the first flush: the target's flush holds its driver lock while it
             * syncs, and a write-blocking guest write would wait for that whole sync.
             */
            vd_mutex_lock(&m->lock);
            /*
             * A small tail is the drained pivot's to copy: another round would put a copy and
             * a flush (syncs) on the path to COMPLETED and leave a new tail behind anyway.
             */
            bool more = m->dirty_bits > 0 &&
                        m->dirty_bits * m->granularity > MIRROR_QUICK_TAIL;
            if (more) {
                m->write_blocking = true;
            }
            vd_mutex_unlock(&m->lock);
            if (more && ++complete_rounds < COMPLETE_ROUNDS) {
                continue;
            }
            r = m->verify ? mirror_verify(m, errp) : 0;
            break;
        }
        if (__atomic_load_n(&m->target_gen, __ATOMIC_SEQ_CST) != m->flushed_gen) {
            /*
             * Ready and in sync after copying what the guest dirtied: make it durable now, while
             * guests run, so complete finds nothing to flush but the drained tail (a failure is
             * retried here and reported by the completion's own flush).
             */
            (void)mirror_flush_target(m);
            continue;
        }
        /* In sync: wait for guest writes (or a verb), then look again. */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)IDLE_WAIT_NS;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        job_set_busy(job, false);
        vd_mutex_lock(&m->lock);
        while (!m->kicked && m->dirty_bits == 0) {
            if (vd_cond_timedwait(&m->cond, &m->lock, &ts) != 0) {
                break;
            }
        }
        m->kicked = false;
        vd_mutex_unlock(&m->lock);
        job_set_busy(job, true);
    }
    /* Failed or cancelled copies re-dirtied their ranges; nothing may run after run returns. */
    copy_engine_drain(e, NULL, NULL);
    copy_engine_wait_writeback(e);
    return r;
}

static int mirror_complete(Job *job, VdError **errp)
{
    Mirror *m = job_opaque(job);
    vd_mutex_lock(&m->lock);
    m->should_complete = true;
    mirror_kick_locked(m);
    vd_mutex_unlock(&m->lock);
    copy_engine_set_urgent(m->engine); /* finish now: no more guest-priority pacing */
    return 0;
}

static bool mirror_cancel(Job *job, bool force, bool ready)
{
    /* Soft cancel of a ready mirror: finish with a consistent target, no pivot (virsh --finish). */
    return force || !ready;
}

static void mirror_kick(Job *job)
{
    Mirror *m = job_opaque(job);
    vd_mutex_lock(&m->lock);
    mirror_kick_locked(m);
    vd_mutex_unlock(&m->lock);
    copy_engine_kick(m->engine); /* a verb: drain the copies in flight and look */
}

/* Writes to the source no longer concern the job (waits for those inside the hook). */
static void mirror_detach_filter(Mirror *m)
{
    vd_mutex_lock(&m->lock);
    m->detached = true;
    vd_mutex_unlock(&m->lock);
    vd_write_hook_remove(m->source, m);
    __atomic_store_n(&((MirrorTop *)m->filter->opaque)->m, NULL, __ATOMIC_RELEASE);
}

/*
 * Finalization after a successful run: with guests quiesced, copy what is still dirty, flush, and
 * either pivot (complete) or leave the guest on the source (soft cancel) with a consistent target.
 */
static int mirror_prepare(Job *job, VdError **errp)
{
    Mirror *m = job_opaque(job);
    uint64_t t0 = job_now_ns();
    MirrorDrained *exps = drain_every_writer(m);
    if (!exps) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    uint64_t syncs0 = vd_flush_thread_syncs(); /* syncs this (QMP) thread makes while drained */
    block_tracker_wait_idle(m->tracker);
    /* Guests are drained: the engine copies the tail in parallel, holding no tracker range. */
    CopyEngine *eng = m->engine;
    uint64_t copied = 0;
    bool is_read = false;
    int r = 0;
    for (;;) {
        CopyChunk c;
        while (copy_engine_reap(eng, &c, false)) {
            if (c.ret < 0 && r == 0) {
                r = c.ret;
                is_read = c.is_read;
            }
        }
        uint64_t first, nb = 0;
        bool have = false;
        if (r == 0 && copy_engine_in_flight(eng) < copy_engine_max_in_flight(eng)) {
            vd_mutex_lock(&m->lock);
            r = m->pending_target_error;
            have = r == 0 && bm_next(m, 0, &first);
            if (have) {
                /* Aligned start, and whole units: submitted copies never share a cluster. */
                first = first * m->granularity / m->align * m->align / m->granularity;
                uint64_t max_bits = m->chunk / m->granularity;
                while (first + nb < m->nbits && nb < max_bits &&
                       (bm_get(m, first + nb) || (first + nb) * m->granularity % m->align)) {
                    nb++;
                }
                nb = nb ? nb : 1;
                uint64_t end = (first + nb) * m->granularity;
                end = end > m->len ? m->len : end;
                uint64_t clipped = copy_engine_clip(eng, first * m->granularity, end, NULL);
                if (clipped == 0) {
                    have = false; /* its cluster is still being copied: wait for that first */
                } else {
                    nb = (clipped - first * m->granularity + m->granularity - 1) / m->granularity;
                    bm_set(m, first * m->granularity, nb * m->granularity, false);
                }
            }
            vd_mutex_unlock(&m->lock);
        }
        if (have) {
            uint64_t off = first * m->granularity;
            uint64_t n = nb * m->granularity;
            n = off + n > m->len ? m->len - off : n;
            copy_engine_submit(eng, off, n, false);
            copied += n;
            continue;
        }
        if (copy_engine_in_flight(eng) == 0) {
            break;
        }
        if (copy_engine_reap(eng, &c, true) && c.ret < 0 && r == 0) {
            r = c.ret;
            is_read = c.is_read;
        }
    }
    if (r == 0) {
        /* Only the tail (if any) is not durable yet: run flushed the rest before the drain. */
        is_read = false;
        r = mirror_flush_target(m);
    }
    vd_mutex_lock(&m->lock);
    bool pivot = m->should_complete;
    vd_mutex_unlock(&m->lock);
    if (r == 0 && pivot && m->rewrite_backing) {
        VdError *e = NULL;
        r = vd_change_backing_file(m->target, m->backing_name, m->backing_fmt, &e);
        if (r < 0) {
            vd_error_propagate(errp, e);
        }
    }
    if (r < 0) {
        vd_error_setg(errp, -r, "Mirror %s error while finishing: %s", is_read ? "read" : "write",
                      strerror(-r));
        drained_resume(exps, NULL, NULL); /* still on the filter; abort puts them back */
        return r;
    }
    if (pivot) {
        /* Before guests reach the target: a journal left behind would copy over their writes. */
        job_journal_remove(m->journal);
        vd_node_set_backing(m->target, m->final_backing);
        /* As QEMU's bdrv_replace_node: a node over the source reads and writes the target now. */
        graph_repoint_parents(m->source, m->target, m->filter);
        m->pivoted = true;
    }
    mirror_detach_filter(m);
    uint64_t syncs = vd_flush_thread_syncs() - syncs0;
    drained_resume(exps, pivot ? m->target : m->source, pivot ? m->target : NULL);
    uint64_t us = (job_now_ns() - t0) / 1000;
    vd_log(VD_LOG_INFO, "mirror '%s': %s; guest I/O paused %llu.%03llu ms (%llu bytes copied "
           "while paused, %llu syncs while paused)", job_id(job),
           pivot ? "pivoted to the target" : "finished without pivot",
           (unsigned long long)(us / 1000), (unsigned long long)(us % 1000),
           (unsigned long long)copied, (unsigned long long)syncs);
    return 0;
}

static void mirror_abort(Job *job)
{
    Mirror *m = job_opaque(job);
    vd_mutex_lock(&m->lock);
    bool detached = m->detached;
    vd_mutex_unlock(&m->lock);
    if (detached) {
        return;
    }
    /* Guests go back to the source, which the job never wrote to. */
    MirrorDrained *exps = drain_every_writer(m);
    block_tracker_wait_idle(m->tracker);
    mirror_detach_filter(m);
    if (exps) {
        drained_resume(exps, m->source, NULL);
    }
}

static void mirror_clean(Job *job)
{
    Mirror *m = job_opaque(job);
    busy_release(m);
    if (!job_journal_keeping_all()) {
        job_journal_remove(m->journal); /* over (vdiskd's shutdown keeps it: resumed next time) */
    }
    if (!m->pivoted) {
        /* Drop the source from under the target: back to what it had (base for a new image). */
        vd_node_set_backing(m->target, m->target_orig_backing ? m->target_orig_backing : m->base);
        /*
         * As QEMU drops drive-mirror's target node when the job ends without a pivot. Runs on the
         * QMP thread (job.c), the graph's only writer. An export the user put on it keeps it open.
         */
        if (m->drop_target) {
            m->drop_target = false;
            int r = graph_unregister(m->target);
            if (r < 0 && r != -ENOENT) {
                vd_log(VD_LOG_WARN, "mirror '%s': node '%s' stays registered: %s",
                       job_id(job), m->target->node_name, strerror(-r));
            }
        }
    }
}

/*
 * query-block-jobs (job mutex held; m->lock is below it). QEMU 8.2's actively-synced: in sync and
 * every guest write reaches both images. vdisk's: the phase, what is dirty, how fast the job copies
 * and guests dirty (bytes/s since the previous sample), and the seconds to READY at those rates
 * (0 once ready; absent while unknown, e.g. when guests dirty as fast as the job copies).
 */
static void mirror_query(Job *job, json_t *info)
{
    Mirror *m = job_opaque(job);
    bool ready = json_is_true(json_object_get(info, "ready"));
    uint64_t copied = __atomic_load_n(&m->copied_total, __ATOMIC_RELAXED);
    vd_mutex_lock(&m->lock);
    job_rates_sample(&m->rates, job_now_ns(), copied, m->dirtied_total);
    uint64_t dirty = dirty_bytes_locked(m);
    bool synced = ready && m->write_blocking && dirty == 0 && !m->pending_target_error;
    const char *phase = m->detached ? "finished"
                      : m->should_complete ? "completing" : ready ? "mirroring" : "copying";
    job_rates_report(info, &m->rates, phase, synced, dirty, copied);
    json_object_set_new(info, "vdisk-copy-mode",
                        json_string(m->write_blocking ? "write-blocking" : "background"));
    json_object_set_new(info, "vdisk-auto-write-blocking", json_boolean(m->auto_write_blocking));
    if (m->resumed) {
        json_object_set_new(info, "vdisk-resumed", json_true());
    }
    vd_mutex_unlock(&m->lock);
}

int mirror_change_copy_mode(Job *job, bool write_blocking, VdError **errp)
{
    if (strcmp(job_type(job), "mirror") != 0) {
        vd_error_setg(errp, EINVAL, "Job type %s doesn't match requested type mirror",
                      job_type(job));
        return -EINVAL;
    }
    Mirror *m = job_opaque(job);
    vd_mutex_lock(&m->lock);
    bool current = m->write_blocking;
    if (current != write_blocking && write_blocking) {
        m->write_blocking = true; /* the next guest write goes to both images */
        mirror_kick_locked(m);
    }
    vd_mutex_unlock(&m->lock);
    if (current && !write_blocking) {
        /* As QEMU 8.2: only background -> write-blocking is implemented. */
        vd_error_setg(errp, ENOTSUP, "Change to copy mode 'background' is not implemented");
        return -ENOTSUP;
    }
    return 0;
}

static void mirror_free_state(Mirror *m)
{
    if (!m) {
        return;
    }
    busy_release(m);
    vd_write_hook_remove(m->source, m); /* a job that never ran: no-op once detached */
    copy_engine_free(m->engine); /* idle by now: run and prepare drained it */
    block_tracker_put(m->tracker);
    block_tracker_put(m->guest_tracker);
    vd_node_unref(m->filter);
    vd_node_unref(m->target_orig_backing);
    vd_node_unref(m->target);
    vd_node_unref(m->base);
    vd_node_unref(m->source);
    free(m->backing_name);
    free(m->backing_fmt);
    free(m->bitmap);
    job_journal_close(m->journal);
    pthread_mutex_destroy(&m->lock);
    pthread_cond_destroy(&m->cond);
    free(m);
}

static void mirror_free(Job *job)
{
    mirror_free_state(job_opaque(job));
}

static const JobDriver mirror_driver = {
    .type = "mirror",
    .run = mirror_run,
    .complete = mirror_complete,
    .cancel = mirror_cancel,
    .prepare = mirror_prepare,
    .abort = mirror_abort,
    .clean = mirror_clean,
    .kick = mirror_kick,
    .query = mirror_query,
    .free = mirror_free,
};

typedef struct FilterOf {
    BlockNode *source, *filter;
} FilterOf;

static void filter_of_cb(Job *job, void *opaque)
{
    FilterOf *f = opaque;
    if (!f->filter && !strcmp(job_type(job), "mirror") &&
        ((Mirror *)job_opaque(job))->source == f->source) {
        f->filter = mirror_filter_node(job);
    }
}

BlockNode *mirror_filter_of_source(BlockNode *source)
{
    FilterOf f = {.source = source};
    job_foreach(filter_of_cb, &f);
    return f.filter;
}

BlockNode *mirror_filter_node(Job *job)
{
    if (!job || strcmp(job_type(job), "mirror") != 0) {
        return NULL;
    }
    Mirror *m = job_opaque(job);
    vd_mutex_lock(&m->lock);
    BlockNode *f = m->detached ? NULL : m->filter;
    vd_mutex_unlock(&m->lock);
    return f;
}

/*
 * The job's journal, before any guest write passes the filter: a new one (every segment marked)
 * when vdiskd has a --state-dir, or the one the job is resumed from, if it still fits the images.
 */
static int mirror_journal_open(Mirror *m, const MirrorOptions *o, VdError **errp)
{
    uint64_t seg = job_journal_segment_size(m->len, m->granularity);
    if (o->resume) {
        seg = job_journal_segment(o->resume);
        if (job_journal_len(o->resume) != m->len || seg < m->granularity ||
            seg % m->granularity) {
            vd_error_setg(errp, EINVAL, "Job journal of '%s' does not fit the images (length "
                          "%llu, segment %llu; now %llu, granularity %llu)", o->job_id,
                          (unsigned long long)job_journal_len(o->resume),
                          (unsigned long long)seg, (unsigned long long)m->len,
                          (unsigned long long)m->granularity);
            return -EINVAL;
        }
        m->journal = o->resume;
        m->resumed = true;
        return 0;
    }
    if (!o->journal_desc) {
        return 0;
    }
    json_t *desc = json_pack("{s:s, s:O, s:I}", "type", "mirror", "request", o->journal_desc,
                             "granularity", (json_int_t)m->granularity);
    int r = desc ? job_journal_create(NULL, o->job_id, desc, m->len, seg, &m->journal, errp)
                 : -ENOMEM;
    if (!desc) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    json_decref(desc);
    return r;
}

static uint64_t pow2_floor(uint64_t v)
{
    return v ? 1ULL << (63 - __builtin_clzll(v)) : 0;
}

Job *mirror_start_ex(const MirrorOptions *o, bool unmap, VdError **errp)
{
    int64_t slen = vd_getlength(o->source), tlen = vd_getlength(o->target);
    if (slen < 0 || tlen < 0) {
        vd_error_setg(errp, EIO, "Cannot get the length of the source or the target");
        return NULL;
    }
    if (o->target->read_only) {
        vd_error_setg(errp, EPERM, "Target '%s' is read-only", o->target->filename);
        return NULL;
    }
    if (o->target == o->source || vd_chain_depth(o->source, o->target) >= 0) {
        vd_error_setg(errp, EINVAL, "The target cannot be part of the source's chain");
        return NULL;
    }
    uint64_t g = o->granularity;
    if (g && (g < 512 || g > (64ULL << 20) || (g & (g - 1)))) {
        vd_error_setg(errp, EINVAL, "Granularity must be a power of 2 between 512 and 64M");
        return NULL;
    }
    uint32_t tcs = o->target->drv->cluster_size ? o->target->drv->cluster_size(o->target) : 0;
    uint32_t scs = o->source->drv->cluster_size ? o->source->drv->cluster_size(o->source) : 0;
    if (!g) {
        g = tcs ? tcs : 65536;
        g = g < 4096 ? 4096 : g > 65536 ? 65536 : g;
    }
    uint64_t buf_size = o->buf_size ? o->buf_size : DEFAULT_BUF_SIZE;
    if (buf_size < g) {
        vd_error_setg(errp, EINVAL, "Parameter 'buf-size' must be at least the granularity");
        return NULL;
    }

    Mirror *m = calloc(1, sizeof(*m));
    if (!m) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    pthread_mutex_init(&m->lock, NULL);
    pthread_condattr_t ca; /* the idle wait uses a CLOCK_MONOTONIC deadline */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&m->cond, &ca);
    pthread_condattr_destroy(&ca);
    m->len = (uint64_t)slen;
    m->granularity = g;
    m->unmap = unmap;
    /* The hook's tracker must cover whole clusters of both images (COW inside one cluster). */
    uint64_t tg = g;
    tg = tcs > tg ? tcs : tg;
    tg = scs > tg ? scs : tg;
    m->tracker_granularity = pow2_floor(tg);
    /*
     * Copy units: short (one copy holds guest writes to its range), whole aligned blocks of
     * both images' clusters, and as many in flight as buf-size allows (at most the engine's
     * default): 16 MiB by default -> 4 x 1 MiB.
     */
    m->align = m->tracker_granularity;
    uint64_t unit = copy_engine_default_unit();
    unit = buf_size < unit ? buf_size : unit;
    m->chunk = unit / m->align * m->align;
    m->chunk = m->chunk ? m->chunk : m->align;
    uint64_t nworkers = buf_size / m->chunk;
    unsigned maxw = copy_engine_default_workers();
    nworkers = nworkers < 1 ? 1 : nworkers > maxw ? maxw : nworkers;
    m->nbits = (m->len + g - 1) / g;
    m->bitmap = calloc((m->nbits + 63) / 64 + 1, sizeof(uint64_t));
    m->source = o->source;
    vd_node_ref(m->source);
    m->target = o->target;
    vd_node_ref(m->target);
    m->base = o->base_is_source ? o->source : o->base;
    vd_node_ref(m->base);
    m->base_is_source = o->base_is_source;
    m->rewrite_backing = o->rewrite_backing;
    m->skip_target_allocated = o->skip_target_allocated;
    m->backing_name = o->backing_name ? strdup(o->backing_name) : NULL;
    m->backing_fmt = o->backing_fmt ? strdup(o->backing_fmt) : NULL;
    /* A target of another size fails the job in mirror_run (as QEMU's): no guest write may
     * reach it before that, so it starts in background mode. */
    m->write_blocking = o->write_blocking && tlen == slen;
    m->on_source_error = o->on_source_error;
    m->on_target_error = o->on_target_error;
    m->target_orig_backing = o->target->backing;
    vd_node_ref(m->target_orig_backing);
    m->final_backing = o->keep_target_backing ? m->target_orig_backing : m->base;
    m->target_new = o->target_new;
    m->shares_base = o->backing_matches || same_image(m->final_backing, m->base);
    /*
     * A target added with "backing": null whose header names a backing file reads that file
     * once opened on its own: its unallocated clusters are not zero (a top's zero clusters
     * must be written), as for a vouched-for backing the job never sees.
     */
    bool header_backing = o->target->drv->supports_backing && o->target->backing_file &&
                          o->target->backing_file[0];
    m->backing_unseen = (o->backing_matches || header_backing) && !m->final_backing;
    m->target_holds_base = m->shares_base && !m->target->drv->supports_backing;
    m->verify = o->verify;
    m->filter = filter_new(m, o->job_id, o->filter_node_name);
    if (!m->bitmap || !m->filter || (o->backing_name && !m->backing_name) ||
        (o->backing_fmt && !m->backing_fmt)) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        mirror_free_state(m);
        return NULL;
    }
    m->tracker = block_tracker_new(m->tracker_granularity);
    m->guest_tracker = block_tracker_get(m->filter);
    CopyEngineOptions eo = {.workers = (unsigned)nworkers, .buf_size = m->chunk, .align = m->align,
                            .tracker = m->tracker, .kind = BT_SHARED, .fn = mirror_copy_chunk,
                            .opaque = m, .guest = m->guest_tracker};
    /* Early writeback of a local target file while copying (copy.h; not an NBD target). */
    eo.writeback = copy_engine_writeback_node(m->target, &eo.writeback_every);
    m->engine = m->tracker && m->guest_tracker ? copy_engine_new(&eo) : NULL;
    if (!m->engine) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        mirror_free_state(m);
        return NULL;
    }

    if (busy_claim(m, o->job_id, errp) < 0 || mirror_journal_open(m, o, errp) < 0) {
        mirror_free_state(m);
        return NULL;
    }
    JobOptions jo = {.id = o->job_id, .auto_finalize = o->auto_finalize,
                     .auto_dismiss = o->auto_dismiss, .speed = o->speed,
                     .node = m->source->node_name};
    Job *job = job_create(&mirror_driver, &jo, m, errp);
    if (!job) {
        if (m->resumed) {
            m->journal = NULL; /* the caller's again: kept for the next start */
        }
        job_journal_remove(m->journal);
        mirror_free_state(m);
        return NULL;
    }
    m->job = job;
    if (m->resumed) {
        job_user_pause(job, NULL); /* offered back PAUSED: job-resume continues it */
    }
    /*
     * From here every write to the source passes the job's hook, and the exports serve the filter
     * (which the pivot swaps for the target). The target reads the source below its own layer
     * until the pivot. All before the scan, so no write is missed.
     */
    vd_node_set_backing(m->target, m->source);
    VdDrainedUsers *exps = exports_drain(m, m->source);
    VdWriteHook hook = {.tracker = m->tracker, .before = source_before_write,
                        .after = source_after_write, .opaque = m};
    m->hook_error = vd_write_hook_add(m->source, &hook); /* fails the job at its start */
    exports_set_node_and_resume(m, exps, m->filter);
    if (!exps) {
        vd_log(VD_LOG_WARN, "mirror '%s': out of memory switching exports", o->job_id);
    }
    if (job_start(job, errp) < 0) {
        return NULL; /* the job aborted: exports are back on the source */
    }
    if (m->resumed) {
        job_wait_paused(job); /* offered back PAUSED: listed so from the first query */
    }
    return job;
}

void mirror_drop_target_at_end(Job *job)
{
    ((Mirror *)job_opaque(job))->drop_target = true;
}

Job *mirror_start(const MirrorOptions *o, VdError **errp)
{
    return mirror_start_ex(o, true, errp);
}
