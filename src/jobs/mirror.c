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
#include "jobs/mirror-internal.h"
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

/* The filter node's state: the way back to the job for a guest's flush (NULL once detached). */
typedef struct MirrorTop {
    Mirror *m;
} MirrorTop;

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

uint64_t mirror_bm_set(Mirror *m, uint64_t offset, uint64_t bytes, bool dirty)
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

bool mirror_bm_get(Mirror *m, uint64_t i)
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

bool mirror_bm_next(Mirror *m, uint64_t from, uint64_t *out)
{
    if (m->dirty_bits == 0) {
        return false;
    }
    from = from < m->nbits ? from : 0;
    return bm_find(m, from, m->nbits, out) || bm_find(m, 0, from, out);
}

uint64_t mirror_dirty_bytes_locked(Mirror *m)
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
        m->dirtied_total += mirror_bm_set(m, offset, bytes, true) * m->granularity;
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
    return mirror_target_final_pread(opaque, off, bytes, buf);
}

static void mirror_resume_differs(void *opaque, uint64_t off, uint64_t bytes)
{
    Mirror *m = opaque;
    vd_mutex_lock(&m->lock);
    mirror_bm_set(m, off, bytes, true);
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
            have = r == 0 && mirror_bm_next(m, 0, &first);
            if (have) {
                /* Aligned start, and whole units: submitted copies never share a cluster. */
                first = first * m->granularity / m->align * m->align / m->granularity;
                uint64_t max_bits = m->chunk / m->granularity;
                while (first + nb < m->nbits && nb < max_bits &&
                       (mirror_bm_get(m, first + nb) || (first + nb) * m->granularity % m->align)) {
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
                    mirror_bm_set(m, first * m->granularity, nb * m->granularity, false);
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
    uint64_t dirty = mirror_dirty_bytes_locked(m);
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
