/*
 * commit.c - block-commit. The base is reopened read-write as a second node of its image and put in
 * the chain in place of the read-only one (with the device's exports drained), so every reader of the
 * chain and the copy see one coherent node.
 * Non-active commit (top below the device): top..above-base are read-only while the guest writes to
 * the device, so their content is copied into base without serialisation; then the overlay above top
 * records base (header), and the chain drops top..above-base; base goes back to read-only.
 * Active commit (top is the device): a dirty bitmap fed by the top's write hook (block/write-hooks.h),
 * which every write to top passes whoever issues it (the exports, a node added over top, another
 * job); each copy holds its range BT_SHARED on the job's own tracker, which the hook holds
 * BT_EXCLUSIVE around each write, so a copy of old data never lands after a newer write: the write
 * either finished before (and its dirty bit was cleared only after it) or re-dirties the range after
 * the copy. READY once flushed and then in sync again;
 * while ready the job keeps copying as guests write (and flushing base after a guest flush), so
 * complete (or a soft cancel) normally drains the exports at once, copies the small dirty tail and
 * swaps the exports onto base (no swap for a soft cancel). It syncs base under drain only when a
 * guest flushed since base last held every write durably (then after a flush made while guests
 * still ran, so the drained sync covers the tail only); otherwise what is not yet synced is the
 * guest's own unflushed writes, which its next flush (of base) makes durable. When much is dirty
 * (a guest writing faster than the copy), bounded finishing rounds copy and flush unthrottled first.
 * Pauses: what the job copied is flushed BEFORE the exports are drained, except a few MiB that the
 * drained flush of the tail covers anyway; a non-active commit rewrites the header above top and
 * reopens base read-only before the drain, so the drained section only switches the chain.
 * Resumable (vdiskd --state-dir, docs/resumable.md): the mirror's segment map. A segment is clean
 * on disk only once base holds, durably, what the chain above it reads there (the sweep passed it,
 * or no dirty bit is left in it, with no copy or guest write in flight, after flushes of base and,
 * active, of the top). A crash leaves base partly updated, which is harmless: the layers above
 * still decide every range the job copies. A resumed job compares its marked segments and copies
 * what differs. The journal is deleted before anything relies on base alone: before the header
 * above top names base (non-active), before guests reach base at the pivot (active).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "block/graph.h"
#include "block/tracking.h"
#include "block/users.h"
#include "block/write-hooks.h"
#include "jobs/blockops.h"
#include "jobs/copy.h"
#include "jobs/job.h"
#include "jobs/journal.h"
#include "util/lock.h"
#include "util/log.h"

#define IDLE_WAIT_NS 100000000ULL
#define COMMIT_FINISH_ROUNDS 4          /* finishing: copy at most this many times what was dirty */
#define COMMIT_FINISH_NS 2000000000ULL  /* ... or for this long, before the drained tail copy */
#define COMMIT_READY_FLUSHES 2 /* flushes of base before READY, at most (commit_run_active) */
/* After a finishing round, pivot when this little is dirty or not yet flushed (the drained tail). */
#define COMMIT_QUICK_TAIL (4ULL << 20)
#define FLUSH_BACKOFF_MIN_NS 10000000ULL   /* a failed flush of base is retried after 10 ms, */
#define FLUSH_BACKOFF_MAX_NS 1000000000ULL /* doubling up to 1 s (on-error=ignore, ready loop) */
#define JOURNAL_CLEAR_NS 1000000000ULL /* clear the journal's in-sync segments about every second */

typedef struct Commit {
    Job *job;
    bool active;
    BlockNode *dev;          /* ref: the node guests use (exports serve it) */
    BlockNode *top;          /* ref: the top-most image committed */
    BlockNode *above;        /* ref: the node whose backing is top (non-active only) */
    BlockNode *base;         /* ref: the original (read-only) base node */
    BlockNode *base_rw;      /* ref: base reopened read-write, in the chain while the job runs */
    BlockNode *base_parent;  /* ref: the node whose backing was base */
    char *backing_name, *backing_fmt; /* what `above` records at the end (non-active) */
    uint64_t len, gran, unit;
    CopyEngine *engine;      /* active: holds the top's range BT_SHARED; non-active: untracked */
    JobErrorAction on_error;
    bool claimed;
    bool base_swapped;       /* base_rw is in the chain */
    uint64_t unflushed;      /* bytes copies wrote to base_rw since its last flush (coordinator) */
    /*
     * Active: the last clean point (coordinator): nothing dirty, no copy in flight, so every
     * guest write acknowledged before it was in base_rw. clean_flush_req: the device's
     * vd_flush_requests read just before. The durable point: the latest clean point after which
     * a flush of base_rw succeeded (or at which nothing was unflushed); a later clean point not
     * yet flushed leaves it where it was. See commit_pivot_needs_sync.
     */
    bool clean_seen, durable_seen;
    uint64_t clean_flush_req, durable_flush_req;

    /* active commit */
    BlockTracker *tracker;   /* the top's (its exports' requests: the copy's pacing) */
    BlockTracker *dev_tracker; /* non-active: the device's (guest activity for the copy's pacing) */
    BlockTracker *hook_tracker; /* active: the job's own; the hook's writes and the copies hold it */
    bool hooked;             /* active: the hook is on top */
    pthread_mutex_t lock;    /* guards below; leaf (taken inside the write hook) */
    pthread_cond_t cond;
    uint64_t *bitmap, nbits, dirty_bits;
    bool kicked, should_complete, pivoted;
    /* query-block-jobs (active): bytes guest writes made dirty, and the rates' samples */
    uint64_t dirtied_total;
    JobRates rates;
    uint64_t copied_total;   /* bytes the job copied (atomic) */

    JobJournal *journal;     /* progress on disk (NULL: no --state-dir); the job thread clears */
    bool resumed;            /* re-created from its journal (non-active: the bitmap is the copy) */
    uint64_t journal_t;      /* last clear (job thread) */
    uint64_t sweep_done;     /* non-active: the sweep copied everything below (job thread) */
    uint64_t top_gen, top_flushed_gen; /* active: guest writes to top / covered by a flush */
} Commit;

/* ---- dirty bitmap (c->lock held) ---- */

/* Returns how many chunks changed state. */
static uint64_t bm_set(Commit *c, uint64_t offset, uint64_t bytes, bool dirty)
{
    uint64_t changed = 0;
    if (bytes == 0 || offset >= c->len) {
        return 0;
    }
    uint64_t first = offset / c->gran, last = (offset + bytes - 1) / c->gran;
    if (last >= c->nbits) {
        last = c->nbits - 1;
    }
    for (uint64_t i = first; i <= last; i++) {
        uint64_t bit = 1ULL << (i % 64);
        bool was = c->bitmap[i / 64] & bit;
        if (dirty && !was) {
            c->bitmap[i / 64] |= bit;
            c->dirty_bits++;
            changed++;
        } else if (!dirty && was) {
            c->bitmap[i / 64] &= ~bit;
            c->dirty_bits--;
            changed++;
        }
    }
    return changed;
}

static bool bm_get(Commit *c, uint64_t i)
{
    return c->bitmap[i / 64] & (1ULL << (i % 64));
}

static bool bm_next(Commit *c, uint64_t from, uint64_t *out)
{
    if (c->dirty_bits == 0) {
        return false;
    }
    for (uint64_t n = 0; n < c->nbits; n++) {
        uint64_t i = (from + n) % c->nbits;
        if (bm_get(c, i)) {
            *out = i;
            return true;
        }
    }
    return false;
}

static uint64_t dirty_bytes(Commit *c)
{
    vd_mutex_lock(&c->lock);
    uint64_t b = c->dirty_bits * c->gran;
    vd_mutex_unlock(&c->lock);
    return b > c->len ? c->len : b;
}

/*
 * Any write to the top, whoever issues it (its write hook; the writer's thread, still holding the
 * range in hook_tracker). Marked whatever the result: a failed write may have changed part of it.
 */
static void commit_after_write(void *opaque, const VdWriteReq *w, int ret)
{
    Commit *c = opaque;
    (void)ret;
    __atomic_add_fetch(&c->top_gen, 1, __ATOMIC_SEQ_CST); /* a journal clear flushes it */
    vd_mutex_lock(&c->lock);
    c->dirtied_total += bm_set(c, w->offset, w->bytes, true) * c->gran;
    c->kicked = true;
    vd_cond_broadcast(&c->cond);
    vd_mutex_unlock(&c->lock);
    job_journal_write_end(c->journal, w->offset, w->bytes);
}

/* Before the write reaches the top: its segments are marked on disk (write-ahead, as mirror's). */
static void commit_before_write(void *opaque, const VdWriteReq *w)
{
    Commit *c = opaque;
    job_journal_write_begin(c->journal, w->offset, w->bytes);
}

/* Writes to top no longer concern the job (waits for those inside the hook: call it drained). */
static void commit_unhook(Commit *c)
{
    if (c->hooked) {
        vd_write_hook_remove(c->top, c);
        c->hooked = false;
    }
}

/* ---- copying ---- */

/*
 * Make base_rw's [off, off+n) read what the chain above it reads there (where a layer above base
 * decides; elsewhere base itself already decides). Caller excludes writers of the range.
 */
static int copy_range(Commit *c, uint64_t off, uint64_t n, uint8_t *buf, uint64_t buf_size,
                      bool *is_read, uint64_t *copied)
{
    uint64_t end = off + n;
    while (off < end) {
        uint64_t pnum = 0;
        VdBlockStatus st;
        *is_read = true;
        int r = vd_block_status_above(c->top, c->base_rw, off, end - off, &pnum, &st);
        if (r < 0) {
            return r;
        }
        if (pnum == 0 || pnum > end - off) {
            pnum = end - off;
        }
        if (st.flags & VD_BS_ALLOCATED) {
            if (st.flags & VD_BS_ZERO) {
                *is_read = false;
                r = vd_pwrite_zeroes(c->base_rw, off, pnum, 0);
            } else {
                for (uint64_t p = off; p < off + pnum && r == 0;) {
                    uint64_t k = off + pnum - p < buf_size ? off + pnum - p : buf_size;
                    *is_read = true;
                    /* From the deciding layer itself: see copy_read_layer. */
                    r = vd_pread(copy_read_layer(c->top, st.layer, p, k), p, k, buf);
                    if (r == 0) {
                        *is_read = false;
                        r = vd_pwrite(c->base_rw, p, k, buf, 0);
                    }
                    p += k;
                }
            }
            if (r < 0) {
                return r;
            }
            *copied += pnum;
        }
        off += pnum;
    }
    return 0;
}

/* An I/O error: 0 = go on (retry/skip), else the error to fail with. */
static int commit_io_error(Commit *c, int r, bool is_read, int *ignored)
{
    JobErrorAction a = job_handle_io_error(c->job, c->on_error, is_read, r);
    if (a == JOB_ERR_REPORT) {
        return r;
    }
    if (a == JOB_ERR_STOP) {
        job_pause_point(c->job);
    } else {
        *ignored = *ignored ? *ignored : r;
    }
    return 0;
}

/*
 * A resumed non-active commit: copy only the granules of the chunk that differ from base
 * (commit_resume_scan's bits; read-only after it), not the whole chunk around them.
 */
static int copy_differing(Commit *c, CopyChunk *ch, uint8_t *buf, uint64_t buf_size)
{
    uint64_t end = ch->off + ch->bytes;
    for (uint64_t off = ch->off; off < end;) {
        uint64_t i = off / c->gran, n = 0;
        vd_mutex_lock(&c->lock);
        bool dirty = bm_get(c, i);
        while (i + n < c->nbits && (i + n) * c->gran < end && bm_get(c, i + n) == dirty) {
            n++;
        }
        vd_mutex_unlock(&c->lock);
        uint64_t run_end = (i + n) * c->gran < end ? (i + n) * c->gran : end;
        if (dirty) {
            int r = copy_range(c, off, run_end - off, buf, buf_size, &ch->is_read, &ch->copied);
            if (r < 0) {
                return r;
            }
        }
        off = run_end;
    }
    return 0;
}

/* One chunk, on a copy worker. Tracked (active run): the range is held; clear its bits only now. */
static void commit_copy_chunk(void *opaque, CopyChunk *ch, uint8_t *buf, uint64_t buf_size)
{
    Commit *c = opaque;
    bool bitmap = c->active && ch->tracked;
    /* Prepare's drained tail (untracked) needs no bookkeeping: the journal goes at the pivot. */
    JobJournal *j = bitmap || !c->active ? c->journal : NULL;
    job_journal_copy_begin(j, ch->off, ch->bytes); /* before the range stops counting dirty */
    if (bitmap) {
        vd_mutex_lock(&c->lock);
        bm_set(c, ch->off, ch->bytes, false);
        vd_mutex_unlock(&c->lock);
    }
    if (c->resumed && !c->active) {
        ch->ret = copy_differing(c, ch, buf, buf_size);
    } else {
        ch->ret = copy_range(c, ch->off, ch->bytes, buf, buf_size, &ch->is_read, &ch->copied);
    }
    if (ch->ret < 0 && bitmap) {
        vd_mutex_lock(&c->lock); /* back to dirty: retried after stop/ignore */
        bm_set(c, ch->off, ch->bytes, true);
        vd_mutex_unlock(&c->lock);
    }
    if (!c->active) {
        __atomic_add_fetch(&c->copied_total, ch->copied, __ATOMIC_RELAXED);
    }
    /*
     * A failed copy keeps its segments "in flight" in the journal for the rest of the job: the
     * sweep retries it (stop) or fails at the end (ignore) after it has moved past the range,
     * so nothing but this count keeps them from being cleared.
     */
    if (ch->ret == 0) {
        job_journal_copy_end(j, ch->off, ch->bytes);
    }
}

/* ---- progress on disk (jobs/journal.h) ---- */

/* Does the job still have work in [off, off+bytes)? (the journal's clear asks, job thread) */
static bool commit_range_dirty(void *opaque, uint64_t off, uint64_t bytes)
{
    Commit *c = opaque;
    if (!c->active) {
        return off + bytes > c->sweep_done;
    }
    uint64_t last = (off + bytes - 1) / c->gran;
    bool dirty = false;
    vd_mutex_lock(&c->lock);
    for (uint64_t i = off / c->gran; i <= last && i < c->nbits && !dirty; i++) {
        dirty = bm_get(c, i);
    }
    vd_mutex_unlock(&c->lock);
    return dirty;
}

/*
 * About once a second (job thread): clear the segments where base holds what the chain above it
 * reads, after flushes that make it so on disk - of base (every copy completed before the flush)
 * and, active, of the top: a guest write held only in top's cache would be lost by a crash while
 * its copy in base survives, and the two would differ in a segment the journal calls clean.
 */
static void commit_journal_tick(Commit *c)
{
    uint64_t t = job_now_ns();
    if (!c->journal || t - c->journal_t < JOURNAL_CLEAR_NS) {
        return;
    }
    c->journal_t = t;
    if (job_journal_clear_collect(c->journal, commit_range_dirty, c) == 0) {
        return;
    }
    uint64_t gen = __atomic_load_n(&c->top_gen, __ATOMIC_SEQ_CST);
    if (c->active && gen != c->top_flushed_gen) {
        if (vd_flush(c->top) < 0) {
            return;
        }
        c->top_flushed_gen = gen;
    }
    if (vd_flush(c->base_rw) == 0) {
        (void)job_journal_clear_commit(c->journal);
    }
}

static void commit_sweep_tick(void *opaque, uint64_t done)
{
    Commit *c = opaque;
    c->sweep_done = done;
    commit_journal_tick(c);
}

/*
 * Resumed from a journal: compare its marked segments (the chain above base as its readers see
 * it, base on its own) and mark dirty what differs. Active: guest writes meanwhile dirty their
 * own ranges.
 */
static void commit_resume_differs(void *opaque, uint64_t off, uint64_t bytes)
{
    Commit *c = opaque;
    vd_mutex_lock(&c->lock);
    bm_set(c, off, bytes, true);
    vd_mutex_unlock(&c->lock);
}

static int commit_resume_scan(Commit *c)
{
    JobJournalScan scan = {.job = c->job, .source = c->top, .dest = c->base_rw,
                           .differs = commit_resume_differs, .opaque = c, .unit = c->unit,
                           .granularity = c->gran};
    return job_journal_resume_scan(c->journal, &scan);
}

/* top..above-base are read-only: what none of them allocates needs no copy (non-active). */
static uint64_t commit_skip(void *opaque, uint64_t off, uint64_t max)
{
    Commit *c = opaque;
    if (c->resumed) {
        /* Resumed: only what differs from base (commit_resume_scan) is copied. */
        uint64_t i = off / c->gran, n = 0;
        vd_mutex_lock(&c->lock);
        while (i + n < c->nbits && n * c->gran < max && !bm_get(c, i + n)) {
            n++;
        }
        vd_mutex_unlock(&c->lock);
        if (n) {
            uint64_t b = (i + n) * c->gran - off;
            return b < max ? b : max;
        }
    }
    uint64_t pnum = 0;
    int r = vd_is_allocated_above(c->top, c->base_rw, off, max, &pnum);
    return r == 0 && pnum <= max ? pnum : 0;
}

static int commit_run_passive(Commit *c, VdError **errp)
{
    int r = c->resumed ? commit_resume_scan(c) : 0;
    if (r < 0) {
        if (r != -ECANCELED) {
            vd_error_setg(errp, -r, "Commit read error: %s", strerror(-r));
        }
        return r;
    }
    job_progress_set_remaining(c->job, c->len);
    CopySweep sw = {.job = c->job, .engine = c->engine, .len = c->len, .unit = c->unit,
                    .align = c->gran, .on_error = c->on_error, .skip = commit_skip,
                    .tick = commit_sweep_tick, .opaque = c};
    r = copy_sweep_run(&sw);
    if (r == -ECANCELED) {
        return r;
    }
    if (r < 0) {
        vd_error_setg(errp, -r, "Commit %s error: %s", sw.failed_is_read ? "read" : "write",
                      strerror(-r));
        return r;
    }
    if (sw.ignored) {
        /* The images above base cannot be dropped with a hole in the copy. */
        vd_error_setg(errp, -sw.ignored, "Commit failed: %s", strerror(-sw.ignored));
        return sw.ignored;
    }
    return 0;
}

static int commit_scan(Commit *c)
{
    for (uint64_t off = 0; off < c->len;) {
        if (job_is_cancelled(c->job)) {
            return -ECANCELED;
        }
        uint64_t pnum = 0;
        int r = vd_is_allocated_above(c->top, c->base_rw, off, c->len - off, &pnum);
        if (r < 0) {
            return r;
        }
        if (pnum == 0) {
            pnum = c->len - off;
        }
        if (r > 0) {
            vd_mutex_lock(&c->lock);
            bm_set(c, off, pnum, true);
            vd_mutex_unlock(&c->lock);
        }
        off += pnum;
    }
    return 0;
}

/*
 * The next dirty range at or after *cursor (wrapping) overlapping no copy in flight: at most
 * max_bytes, starting on a granularity boundary (whole clusters of top and base). With drained
 * (prepare: untracked copies), its bits are cleared here instead of by the worker.
 */
static bool commit_pick(Commit *c, uint64_t *cursor, uint64_t max_bytes, bool drained,
                        uint64_t *off, uint64_t *n)
{
    uint64_t g = c->gran, from = *cursor;
    unsigned tries = copy_engine_max_in_flight(c->engine) + 2;
    bool found = false;
    uint64_t max_bits = max_bytes / g ? max_bytes / g : 1;
    vd_mutex_lock(&c->lock);
    for (unsigned t = 0; t < tries && !found; t++) {
        uint64_t first = 0, nb = 0;
        if (!bm_next(c, from >= c->nbits ? 0 : from, &first)) {
            break;
        }
        while (first + nb < c->nbits && nb < max_bits && bm_get(c, first + nb)) {
            nb++;
        }
        uint64_t start = first * g, end = (first + nb) * g;
        end = end > c->len ? c->len : end;
        uint64_t skip = 0;
        uint64_t e2 = copy_engine_clip(c->engine, start, end, &skip);
        if (e2 == 0) {
            from = skip / g;
            continue;
        }
        *off = start;
        *n = e2 - start;
        *cursor = (e2 + g - 1) / g;
        if (drained) {
            bm_set(c, start, e2 - start, false);
        }
        found = true;
    }
    vd_mutex_unlock(&c->lock);
    return found;
}

typedef struct CommitReap {
    Commit *c;
    bool failed;
    CopyChunk first_failure;
    bool finishing;
    uint64_t finish_copied;
    uint64_t to_account;
} CommitReap;

static void commit_reaped(void *opaque, const CopyChunk *ch)
{
    CommitReap *cr = opaque;
    Commit *c = cr->c;
    /* A failed copy may have written part of its range. */
    c->unflushed += ch->ret < 0 ? ch->bytes : ch->copied;
    if (ch->ret < 0) {
        if (!cr->failed) { /* only the first of a batch is reported; the others retry */
            cr->failed = true;
            cr->first_failure = *ch;
        }
        return;
    }
    job_progress_update(c->job, ch->bytes);
    __atomic_add_fetch(&c->copied_total, ch->bytes, __ATOMIC_RELAXED);
    uint64_t rem = dirty_bytes(c);
    job_progress_set_remaining(c->job, (!job_is_ready(c->job) && rem == 0) ? 1 : rem);
    if (cr->finishing) {
        cr->finish_copied += ch->bytes;
    } else if (ch->copied && job_get_speed(c->job)) {
        cr->to_account += ch->copied;
    }
}

/*
 * Make base_rw's copies durable, on the coordinator with nothing in flight, while guests run: before
 * READY and at the end of each finishing round (as the mirror, and QEMU, flush before READY), so
 * prepare flushes under drain only the tail it copies itself and complete -> COMPLETED takes no
 * sync of the whole commit.
 */
static int commit_flush_base(Commit *c)
{
    if (!c->unflushed) {
        return 0;
    }
    uint64_t was = c->unflushed;
    bool seen = c->clean_seen;
    uint64_t req = c->clean_flush_req;
    c->unflushed = 0;
    int r = vd_flush(c->base_rw);
    c->unflushed += r < 0 ? was : 0;
    if (r == 0 && seen) {
        /* This flush started after that clean point: it is the durable point now. */
        c->durable_seen = true;
        c->durable_flush_req = req;
    }
    return r;
}

/*
 * A clean point (coordinator, no copy in flight): flush_req is the device's vd_flush_requests,
 * read BEFORE the bitmap was found empty. A guest flush counted in it started after the writes
 * it covers were acknowledged, whose dirty bits were set before that: they were all copied (the
 * bitmap was empty after the read and every copy was reaped), so a base_rw flush started from
 * here on makes them durable in base.
 */
static void commit_note_clean(Commit *c, uint64_t flush_req)
{
    c->clean_seen = true;
    c->clean_flush_req = flush_req;
    if (c->unflushed == 0) {
        c->durable_seen = true;
        c->durable_flush_req = flush_req;
    }
}

/*
 * Must the pivot sync base_rw while guests are drained? Only if a guest may have been promised
 * durability for a write base_rw does not hold durably: not when no guest flush (or FUA write)
 * has started since the durable point (a clean point after which base_rw was flushed). The
 * writes since then (copied by the drained tail or earlier, not yet synced) were never flushed
 * by the guest; after the pivot they are in base_rw, and the guest's next flush, now of base_rw,
 * syncs them - the promise a disk makes for writes it acknowledged without FUA. Call with guests
 * drained for the final answer (no flush starts until they resume).
 */
static bool commit_pivot_needs_sync(Commit *c)
{
    return !c->durable_seen || vd_flush_requests(c->dev) != c->durable_flush_req;
}

/*
 * After a flush of base the loop retries when it failed (on-error=ignore, or the ready loop's own
 * flush): wait first, 10 ms doubling to 1 s, as QEMU's jobs pause between retries, rather than
 * syncing a failing disk in a tight loop. A success resets the wait.
 */
static void flush_retry(Job *job, int r, uint64_t *backoff)
{
    if (r == 0) {
        *backoff = 0;
        return;
    }
    *backoff = *backoff ? *backoff * 2 : FLUSH_BACKOFF_MIN_NS;
    *backoff = *backoff > FLUSH_BACKOFF_MAX_NS ? FLUSH_BACKOFF_MAX_NS : *backoff;
    job_sleep_ns(job, *backoff);
}

static int commit_run_active(Commit *c, VdError **errp)
{
    Job *job = c->job;
    CopyEngine *e = c->engine;
    int r = c->resumed ? commit_resume_scan(c) : commit_scan(c);
    if (r < 0) {
        if (r != -ECANCELED) {
            vd_error_setg(errp, -r, "Cannot read the block status of the top: %s", strerror(-r));
        }
        return r;
    }
    job_progress_set_remaining(job, dirty_bytes(c) ? dirty_bytes(c) : 1);
    uint64_t cursor = 0;
    int ignored = 0;
    CommitReap cr = {.c = c};
    /*
     * Finishing (ready, then complete or soft cancel): as the mirror does, stop waiting for the
     * bitmap to empty by itself. The speed limit no longer applies (the user asked to finish),
     * a bounded amount is copied while guests still run, and prepare copies the rest under drain,
     * so this converges even when the guest writes faster than the copy.
     */
    uint64_t finish_budget = 0, finish_deadline = 0;
    unsigned finish_rounds = 0, ready_flushes = 0;
    uint64_t flush_backoff = 0; /* after a failed flush of base that is retried: see flush_retry */
    for (;;) {
        CopyChunk ch;
        while (copy_engine_reap(e, &ch, false)) {
            commit_reaped(&cr, &ch);
        }
        commit_journal_tick(c);
        copy_engine_note_dirty(e, dirty_bytes(c)); /* the convergence floor */
        /* Quiet points (nothing in flight): see mirror_run. */
        uint64_t speed = cr.finishing ? 0 : job_get_speed(job);
        if (copy_engine_take_kick(e) || cr.failed || speed) {
            copy_engine_drain(e, commit_reaped, &cr);
        }
        if (copy_engine_in_flight(e) == 0) {
            if (cr.to_account) {
                job_rate_limit(job, cr.to_account);
                cr.to_account = 0;
            }
            if (cr.failed) {
                cr.failed = false;
                bool is_read = cr.first_failure.is_read;
                int err = commit_io_error(c, cr.first_failure.ret, is_read, &ignored);
                if (err < 0) {
                    vd_error_setg(errp, -err, "Commit %s error: %s", is_read ? "read" : "write",
                                  strerror(-err));
                    r = err;
                    break;
                }
                if (ignored) {
                    job_sleep_ns(job, 10000000); /* retry later, without spinning */
                }
                continue;
            }
            job_pause_point(job);
            if (job_is_cancelled(job)) {
                r = -ECANCELED;
                break;
            }
        }
        if (!cr.finishing && job_is_ready(job)) {
            vd_mutex_lock(&c->lock);
            bool done = c->should_complete;
            vd_mutex_unlock(&c->lock);
            if (done || job_cancel_requested(job)) {
                uint64_t d = dirty_bytes(c);
                cr.finishing = true;
                copy_engine_set_urgent(e); /* asked to finish: no more guest-priority pacing */
                cr.finish_copied = 0;
                finish_budget = d > c->unit ? d : c->unit;
                finish_deadline = job_now_ns() + COMMIT_FINISH_NS;
            }
        }
        if (cr.finishing) {
            /*
             * Rounds of "copy what was dirty at the round's start, flush it while guests run".
             * Pivot when nothing is left (the ready loop keeps base in sync and flushed, so an
             * idle guest's commit pivots at once and syncs nothing while drained), or when what
             * prepare must copy and flush with guests drained is small: at once if a guest is
             * writing (something is dirty: a round would put a copy and a flush on the path to
             * COMPLETED and still leave a tail dirtied meanwhile; the drained flush covers both),
             * after the first round if only unflushed copies are left (an idle guest, whose
             * pivot then syncs nothing while drained), or after a few rounds (a guest writing
             * faster than the copy leaves the rest to the tail).
             */
            uint64_t d = dirty_bytes(c);
            bool round_over = cr.finish_copied >= finish_budget;
            bool clean = d == 0 && c->unflushed == 0 && copy_engine_in_flight(e) == 0;
            /*
             * No guest flush since base was durable: the drained pivot will not sync, so the
             * rounds need not flush either, and only the drained copy is left to keep small.
             */
            bool quiet = !commit_pivot_needs_sync(c);
            bool small = quiet ? d <= COMMIT_QUICK_TAIL
                               : (finish_rounds > 0 || d > 0) &&
                                 d + c->unflushed <= COMMIT_QUICK_TAIL;
            if (clean || job_now_ns() >= finish_deadline ||
                finish_rounds >= COMMIT_FINISH_ROUNDS || small) {
                r = 0; /* prepare copies what is still dirty, guests drained */
                break;
            }
            if (round_over) {
                copy_engine_drain(e, commit_reaped, &cr);
                if (!quiet) {
                    (void)commit_flush_base(c); /* on error prepare flushes again, fails */
                }
                finish_rounds++;
                d = dirty_bytes(c);
                cr.finish_copied = 0;
                finish_budget = d > c->unit ? d : c->unit;
                continue;
            }
        }
        uint64_t chunk = c->unit;
        unsigned max_in_flight = copy_engine_allowed(e);
        if (speed) {
            chunk = speed / 10 < chunk ? speed / 10 : chunk;
            max_in_flight = 1;
        }
        unsigned in_flight = copy_engine_in_flight(e);
        uint64_t off = 0, n = 0;
        if (in_flight < max_in_flight && commit_pick(c, &cursor, chunk, false, &off, &n)) {
            /* Shared: excludes guest writes (exclusive) to the range, not guest reads. */
            copy_engine_submit(e, off, n, true);
            continue;
        }
        if (in_flight > 0) {
            if (copy_engine_reap(e, &ch, true)) {
                commit_reaped(&cr, &ch);
            }
            continue;
        }
        uint64_t flush_req = vd_flush_requests(c->dev); /* before the bitmap: see note_clean */
        vd_mutex_lock(&c->lock);
        bool have = c->dirty_bits > 0;
        vd_mutex_unlock(&c->lock);
        if (have) {
            continue; /* dirtied since the pick */
        }
        commit_note_clean(c, flush_req);
        if (cr.finishing) {
            finish_budget = 0; /* in sync: this round is over (flush, maybe one more) */
            continue;
        }
        if (!job_is_ready(job)) {
            /*
             * READY at a clean point with a durable point no guest flush has passed since, so
             * that a complete sent at READY drains at once and syncs nothing. The flush making
             * it durable takes a while (~150 ms after 1 GB copied) and a guest keeps writing:
             * copy what it dirtied meanwhile before announcing READY, or complete finds it
             * dirty (19-35 MB at 2000 IOPS in the jobs bench) and copies it on the way to
             * COMPLETED. At most COMMIT_READY_FLUSHES flushes: a guest that flushes all the time
             * would otherwise keep the job from READY.
             */
            if (commit_pivot_needs_sync(c) && ready_flushes < COMMIT_READY_FLUSHES) {
                ready_flushes++;
                int fr = commit_flush_base(c);
                if (fr < 0) {
                    ready_flushes--;
                    int err = commit_io_error(c, fr, false, &ignored);
                    if (err < 0) {
                        vd_error_setg(errp, -err, "Commit write error: %s", strerror(-err));
                        r = err;
                        break;
                    }
                }
                flush_retry(job, fr, &flush_backoff);
                continue;
            }
            job_transition_to_ready(job);
            continue;
        }
        vd_mutex_lock(&c->lock);
        bool done = c->should_complete;
        vd_mutex_unlock(&c->lock);
        if (done || job_cancel_requested(job)) {
            continue; /* the finishing rounds above: flush, then prepare */
        }
        if (c->unflushed && commit_pivot_needs_sync(c)) {
            /*
             * Ready and in sync, and a guest flushed since the durable point: make base durable
             * again (a failure is left for the next try and for prepare), so complete finds
             * nothing to sync but the tail. With no guest flush nothing needs it: the pivot
             * syncs nothing, and the coordinator does not stop copying for a flush (a complete
             * arriving during one found what the guest dirtied meanwhile to copy).
             */
            flush_retry(job, commit_flush_base(c), &flush_backoff);
            continue;
        }
        uint64_t deadline = job_now_ns() + IDLE_WAIT_NS;
        struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000ULL),
                              .tv_nsec = (long)(deadline % 1000000000ULL)};
        job_set_busy(job, false);
        vd_mutex_lock(&c->lock);
        while (!c->kicked && c->dirty_bits == 0) {
            if (vd_cond_timedwait(&c->cond, &c->lock, &ts) != 0) {
                break;
            }
        }
        c->kicked = false;
        vd_mutex_unlock(&c->lock);
        job_set_busy(job, true);
    }
    copy_engine_drain(e, commit_reaped, &cr); /* failed/cancelled copies re-dirtied their ranges */
    /*
     * An early writeback may still be starting the disk writes of base's file
     * (sync_file_range, no sync). Wait for it here, while guests run, when prepare syncs base
     * (that sync would wait behind it while guests are drained): a failure, a soft cancel, a
     * guest flush since base was durable. A pivot that syncs nothing need not wait for a
     * writeback it does not rely on (the wait was once 49 ms of complete -> COMPLETED): the
     * writeback ends on its own and is joined when the job is freed, after the event; base_rw,
     * whose file it writes back, lives as long as the job.
     */
    vd_mutex_lock(&c->lock);
    bool pivot = c->should_complete;
    vd_mutex_unlock(&c->lock);
    if (r < 0 || !pivot || commit_pivot_needs_sync(c)) {
        copy_engine_wait_writeback(e);
    }
    return r;
}

static int commit_run(Job *job, VdError **errp)
{
    Commit *c = job_opaque(job);
    if (c->resumed) {
        job_pause_point(job); /* re-created PAUSED: nothing runs before job-resume */
    }
    return c->active ? commit_run_active(c, errp) : commit_run_passive(c, errp);
}

static int commit_complete(Job *job, VdError **errp)
{
    Commit *c = job_opaque(job);
    if (!c->active) {
        vd_error_setg(errp, ENOTSUP, "The active block job '%s' cannot be completed",
                      job_id(job));
        return -ENOTSUP;
    }
    vd_mutex_lock(&c->lock);
    c->should_complete = true;
    c->kicked = true;
    vd_cond_broadcast(&c->cond);
    vd_mutex_unlock(&c->lock);
    /*
     * No more guest-priority pacing: a copy in flight may be waiting out its gap (up to 1 s at
     * the floor), and the coordinator waits for it before it sees the complete.
     */
    copy_engine_set_urgent(c->engine);
    return 0;
}

static bool commit_cancel(Job *job, bool force, bool ready)
{
    /* A ready active commit takes a soft cancel as "finish without pivot", as a mirror does. */
    return force || !ready;
}

static void commit_kick(Job *job)
{
    Commit *c = job_opaque(job);
    vd_mutex_lock(&c->lock);
    c->kicked = true;
    vd_cond_broadcast(&c->cond);
    vd_mutex_unlock(&c->lock);
    copy_engine_kick(c->engine); /* a verb: drain the copies in flight and look */
}

/* Record base in the header of `above` (reopening it read-write when it is a read-only layer). */
static int rewrite_above_header(Commit *c, VdError **errp)
{
    const char *fmt = c->backing_fmt;
    if (!c->above->read_only) {
        return vd_change_backing_file(c->above, c->backing_name, fmt, errp);
    }
    BlockNode *rw = vd_reopen(c->above, true, errp);
    if (!rw) {
        return -EIO;
    }
    int r = vd_change_backing_file(rw, c->backing_name, fmt, errp);
    vd_node_unref(rw);
    if (r == 0 && vd_set_backing_strings(c->above, c->backing_name, fmt) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        r = -ENOMEM;
    }
    return r;
}

/*
 * Put a fresh read-only node of base back in the chain in place of base_rw (the job did not make
 * base the guest's image), as QEMU reopens base read-only. drained: the caller drained the exports
 * and already flushed base_rw after its last write (no sync while guests wait).
 */
static void restore_ro_base(Commit *c, bool drained)
{
    if (!c->base_swapped) {
        return;
    }
    VdError *e = NULL;
    int r = drained ? 0 : vd_flush(c->base_rw);
    BlockNode *ro = r == 0 ? vd_reopen(c->base_rw, false, &e) : NULL;
    if (!ro) {
        vd_log(VD_LOG_WARN, "commit '%s': base '%s' stays read-write: %s", job_id(c->job),
               c->base_rw->filename, e ? vd_error_msg(e) : strerror(-r));
        vd_error_free(e);
        return;
    }
    GraphDrained set;
    if (!drained && graph_drain_writers(c->base_parent, NULL, &set) < 0) {
        vd_node_unref(ro);
        return;
    }
    if (c->base_parent->backing == c->base_rw) {
        vd_node_set_backing(c->base_parent, ro);
        graph_replace_node(c->base_rw, ro);
    }
    if (!drained) {
        graph_resume_writers(&set, NULL);
    }
    vd_node_unref(ro);
    c->base_swapped = false;
}

/*
 * After an active commit's pivot the images above base left the guest's chain: overlays a job
 * registered (snapshots) go, as QEMU drops them; blockdev-add's nodes stay until blockdev-del.
 * base_rw stays findable by its name (registered) whatever still leads to it.
 */
static void commit_drop_overlays(Commit *c)
{
    for (BlockNode *n = c->dev; n && n != c->base_rw; n = n->backing) {
        graph_drop_implicit(n);
    }
    if (graph_find_node(c->base_rw->node_name) != c->base_rw) {
        VdError *e = NULL;
        if (graph_register(c->base_rw, &e) < 0) {
            vd_log(VD_LOG_WARN, "commit '%s': node '%s' not registered: %s", job_id(c->job),
                   c->base_rw->node_name, vd_error_msg(e));
            vd_error_free(e);
        }
    }
}

static int commit_prepare(Job *job, VdError **errp)
{
    Commit *c = job_opaque(job);
    /*
     * run returned: every copy of the job is written. Make them durable while guests still run,
     * so that a sync under drain (when one is needed: commit_pivot_needs_sync) covers only the
     * tail copied there. When none is needed, the copies not yet synced wait for the guest's
     * next flush (of base, after the pivot), and complete -> COMPLETED makes no sync at all.
     */
    int r = !c->active ? vd_flush(c->base_rw)
            : commit_pivot_needs_sync(c) ? commit_flush_base(c) : 0;
    if (r < 0) {
        vd_error_setg(errp, -r, "Could not flush '%s': %s", c->base_rw->filename, strerror(-r));
        return r;
    }
    /*
     * Non-active: base has everything top..above-base decided (durable since the flush above;
     * nothing writes base_rw any more: guests write above top). Record base in `above`'s header
     * and open base read-only again while guests still run: the header's syncs and the open's
     * reads cost the guest nothing here, and the header is already right for a crash from now on
     * (base reads like the chain it replaces). Readers go by the in-memory chain, switched below
     * with the exports drained.
     */
    BlockNode *final = NULL;
    if (!c->active) {
        /*
         * base holds everything durably: the journal goes before the header names base (a job
         * resumed over the new chain would find no top). A crash from here on leaves a chain
         * that reads right either way, and no job.
         */
        job_journal_remove(c->journal);
        r = rewrite_above_header(c, errp);
        if (r == 0) {
            /* Back to read-only, with metadata read after every write of the copy. */
            final = vd_reopen(c->base_rw, false, errp);
            r = final ? 0 : -EIO;
        }
        if (r < 0) {
            return r;
        }
    }
    uint64_t t0 = job_now_ns();
    /*
     * Every writer of the node that goes (active: the top) or whose backing changes (`above`),
     * and of every node over it: exports added during the job, a raw node over it with its own.
     */
    GraphDrained set;
    if (graph_drain_writers(c->active ? c->top : c->above, NULL, &set) < 0) {
        vd_node_unref(final);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    uint64_t syncs0 = vd_flush_thread_syncs(); /* syncs this (QMP) thread makes while drained */
    if (c->active) {
        block_tracker_wait_idle(c->hook_tracker);
        /* Guests are drained: the engine copies the tail in parallel, holding no range. */
        uint64_t tail = 0; /* bytes written to base_rw under drain */
        uint64_t cursor = 0;
        for (;;) {
            CopyChunk ch;
            while (copy_engine_reap(c->engine, &ch, false)) {
                tail += ch.copied + (ch.ret < 0);
                r = ch.ret < 0 && r == 0 ? ch.ret : r;
            }
            uint64_t off = 0, n = 0;
            if (r == 0 && copy_engine_in_flight(c->engine) < copy_engine_max_in_flight(c->engine)
                && commit_pick(c, &cursor, c->unit, true, &off, &n)) {
                copy_engine_submit(c->engine, off, n, false);
                continue;
            }
            if (copy_engine_in_flight(c->engine) == 0) {
                vd_mutex_lock(&c->lock);
                bool more = r == 0 && c->dirty_bits > 0;
                vd_mutex_unlock(&c->lock);
                if (more) {
                    continue;
                }
                break;
            }
            if (copy_engine_reap(c->engine, &ch, true)) {
                tail += ch.copied + (ch.ret < 0);
                r = ch.ret < 0 && r == 0 ? ch.ret : r;
            }
        }
        c->unflushed += tail;
        vd_mutex_lock(&c->lock);
        bool pivot = c->should_complete;
        vd_mutex_unlock(&c->lock);
        /*
         * The tail and run's last copies (base_rw's own writes: guests write the top): synced
         * now if a guest asked for durability since base was last durable (guests are drained:
         * no flush starts meanwhile), or if base goes back to read-only (soft cancel).
         */
        uint64_t left = 0;
        if (r == 0 && (!pivot || commit_pivot_needs_sync(c))) {
            r = commit_flush_base(c);
        } else if (r == 0) {
            left = c->unflushed;
        }
        if (r < 0) {
            vd_error_setg(errp, -r, "Commit error while finishing: %s", strerror(-r));
        }
        /* Still drained: a guest writing without pause cannot starve the hook's removal. */
        commit_unhook(c);
        if (r == 0 && pivot) {
            /*
             * Before guests reach base: a journal left behind would bring back a commit of a top
             * they no longer write, over their writes to base.
             */
            job_journal_remove(c->journal);
            c->pivoted = true;
            c->base_swapped = false; /* base_rw is now the guest's image */
            /* As QEMU's bdrv_replace_node: a node over the top reads and writes base now. */
            graph_repoint_parents(c->top, c->base_rw, NULL);
            graph_resume_writers(&set, c->base_rw);
            commit_drop_overlays(c);
        } else {
            if (r == 0) {
                restore_ro_base(c, true);
            }
            graph_resume_writers(&set, NULL);
        }
        uint64_t us = (job_now_ns() - t0) / 1000;
        vd_log(VD_LOG_INFO, "commit '%s': %s; guest I/O paused %llu us (%llu bytes copied while "
               "paused, %llu syncs while paused, %llu bytes left for the guest's next flush)",
               job_id(job), r < 0 ? "failed" : pivot ? "pivoted to the base" : "finished without pivot",
               (unsigned long long)us, (unsigned long long)tail,
               (unsigned long long)(vd_flush_thread_syncs() - syncs0), (unsigned long long)left);
        return r;
    }

    /* Non-active: switch `above` onto base (header and read-only base made above). */
    vd_node_set_backing(c->above, final);
    graph_replace_node(c->base_rw, final);
    vd_node_unref(final);
    c->base_swapped = false; /* base_rw left the chain with the committed images */
    uint64_t syncs = vd_flush_thread_syncs() - syncs0;
    graph_resume_writers(&set, NULL);
    uint64_t us = (job_now_ns() - t0) / 1000;
    vd_log(VD_LOG_INFO, "commit '%s': %s; guest I/O paused %llu us (%llu syncs while paused)",
           job_id(job), r < 0 ? "failed" : "committed", (unsigned long long)us,
           (unsigned long long)syncs);
    return r;
}

static void commit_abort(Job *job)
{
    Commit *c = job_opaque(job);
    GraphDrained set;
    if (c->hooked && graph_drain_writers(c->top, NULL, &set) == 0) {
        commit_unhook(c); /* every writer drained, as in prepare */
        graph_resume_writers(&set, NULL);
    }
    /*
     * A drain that failed (out of memory) still unhooks: the hook list's lock prefers its writer,
     * so the removal waits for the writes in flight, not for a pause in the guest's writes.
     */
    commit_unhook(c);
    restore_ro_base(c, false);
}

static void commit_clean(Job *job)
{
    Commit *c = job_opaque(job);
    commit_unhook(c);
    if (!job_journal_keeping_all()) {
        job_journal_remove(c->journal); /* over (vdiskd's shutdown keeps it: resumed next time) */
    }
    if (c->claimed) {
        blockops_release(c->dev);
        c->claimed = false;
    }
}

static void commit_free_state(Commit *c)
{
    if (!c) {
        return;
    }
    commit_unhook(c);
    if (c->claimed) {
        blockops_release(c->dev);
    }
    copy_engine_free(c->engine);
    if (c->tracker) {
        block_tracker_put(c->tracker);
    }
    if (c->hook_tracker) {
        block_tracker_put(c->hook_tracker);
    }
    if (c->dev_tracker) {
        block_tracker_put(c->dev_tracker);
    }
    vd_node_unref(c->base_parent);
    vd_node_unref(c->base_rw);
    vd_node_unref(c->base);
    vd_node_unref(c->above);
    vd_node_unref(c->top);
    vd_node_unref(c->dev);
    free(c->backing_name);
    free(c->backing_fmt);
    free(c->bitmap);
    job_journal_close(c->journal);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

static void commit_free(Job *job)
{
    commit_free_state(job_opaque(job));
}

/*
 * query-block-jobs of an active commit (job mutex held; c->lock is below it): mirror's progress
 * members (job_rates_report). actively-synced stays false: guest writes reach base only through
 * the job's copies (QEMU's active commit is a background-mode mirror too).
 */
static void commit_query(Job *job, json_t *info)
{
    Commit *c = job_opaque(job);
    if (c->resumed) {
        json_object_set_new(info, "vdisk-resumed", json_true());
    }
    if (!c->active) {
        json_object_set_new(info, "vdisk-copied-bytes", json_integer((json_int_t)__atomic_load_n(
                                                            &c->copied_total, __ATOMIC_RELAXED)));
        return;
    }
    bool ready = json_is_true(json_object_get(info, "ready"));
    uint64_t copied = __atomic_load_n(&c->copied_total, __ATOMIC_RELAXED);
    vd_mutex_lock(&c->lock);
    job_rates_sample(&c->rates, job_now_ns(), copied, c->dirtied_total);
    uint64_t dirty = c->dirty_bits * c->gran > c->len ? c->len : c->dirty_bits * c->gran;
    const char *phase = c->should_complete ? "completing" : ready ? "mirroring" : "copying";
    job_rates_report(info, &c->rates, phase, false, dirty, copied);
    vd_mutex_unlock(&c->lock);
}

static const JobDriver commit_driver = {
    .type = "commit",
    .run = commit_run,
    .complete = commit_complete,
    .cancel = commit_cancel,
    .prepare = commit_prepare,
    .abort = commit_abort,
    .clean = commit_clean,
    .kick = commit_kick,
    .query = commit_query,
    .free = commit_free,
};

/* The node in dev's chain whose backing is bs (NULL if bs is dev or not in the chain). */
static BlockNode *chain_parent(BlockNode *dev, BlockNode *bs)
{
    for (BlockNode *n = dev; n; n = n->backing) {
        if (n->backing == bs) {
            return n;
        }
    }
    return NULL;
}

static uint64_t pow2_floor(uint64_t v)
{
    return v ? 1ULL << (63 - __builtin_clzll(v)) : 0;
}

/*
 * The job's journal: the one it is resumed from if it still fits (the same images, found again by
 * their files, the same kind of commit and the same length), else a new one (every segment
 * marked) when vdiskd has a state directory. Before any copy and before the hook is in place.
 */
static int commit_journal_open(Commit *c, const CommitRequest *r, const char *job_id,
                               VdError **errp)
{
    uint64_t seg = job_journal_segment_size(c->len, c->gran);
    if (r->resume) {
        json_t *d = job_journal_desc(r->resume);
        seg = job_journal_segment(r->resume);
        if (json_is_true(json_object_get(d, "active")) != c->active ||
            job_journal_len(r->resume) != c->len || seg < c->gran || seg % c->gran) {
            vd_error_setg(errp, EINVAL, "Job journal of '%s' does not fit the images (%s commit "
                          "of %llu bytes, segment %llu; now %s, %llu bytes, granularity %llu)",
                          job_id, json_is_true(json_object_get(d, "active")) ? "active" : "a",
                          (unsigned long long)job_journal_len(r->resume),
                          (unsigned long long)seg, c->active ? "active" : "not active",
                          (unsigned long long)c->len, (unsigned long long)c->gran);
            return -EINVAL;
        }
        c->journal = r->resume;
        c->resumed = true;
        return 0;
    }
    if (!job_journal_dir()) {
        return 0;
    }
    /* Names resolved to files (node names of a chain opened from headers vary between runs). */
    json_t *desc = json_pack("{s:s, s:b, s:{s:s, s:s, s:s, s:s, s:s?, s:I, s:i, s:b, s:b}}",
                             "type", "commit", "active", c->active, "request",
                             "job-id", job_id, "device", r->device, "top", c->top->filename,
                             "base", c->base->filename, "backing-file", c->backing_name,
                             "speed", (json_int_t)r->speed, "on-error", r->on_error,
                             "auto-finalize", r->auto_finalize, "auto-dismiss", r->auto_dismiss);
    int ret = desc ? job_journal_create(NULL, job_id, desc, c->len, seg, &c->journal, errp)
                   : -ENOMEM;
    if (!desc) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    json_decref(desc);
    return ret;
}

/* The job did not start: a new journal is deleted, a resumed one is the caller's again (kept). */
static void commit_journal_drop(Commit *c)
{
    if (c->resumed) {
        c->journal = NULL; /* the caller's again: kept for the next start */
    } else {
        job_journal_remove(c->journal);
    }
}

int commit_request_start(const CommitRequest *r, VdError **errp)
{
    const char *device = r->device, *job_id = r->job_id, *base_node = r->base_node;
    const char *base_name = r->base, *top_node = r->top_node, *top_name = r->top;
    const char *backing_file = r->backing_file;
    int64_t speed = r->speed;

    if (r->has_filter_node_name) {
        vd_error_setg(errp, ENOTSUP, "Parameter 'filter-node-name' is not supported");
        return -ENOTSUP;
    }
    BlockNode *dev = graph_find_node(device);
    if (!dev) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", device, device);
        return -EINVAL;
    }
    if (!job_id) {
        job_id = device;
    }
    if (speed < 0) {
        vd_error_setg(errp, EINVAL, "Invalid parameter 'speed'");
        return -EINVAL;
    }
    JobErrorAction on_err = (JobErrorAction)r->on_error;
    if (top_node && top_name) {
        vd_error_setg(errp, EINVAL, "'top-node' and 'top' are mutually exclusive");
        return -EINVAL;
    }
    if (base_node && base_name) {
        vd_error_setg(errp, EINVAL, "'base-node' and 'base' are mutually exclusive");
        return -EINVAL;
    }
    BlockNode *top = dev;
    if (top_node) {
        top = graph_find_node(top_node);
        if (!top) {
            vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", top_node,
                          top_node);
            return -EINVAL;
        }
        if (vd_chain_depth(dev, top) < 0) {
            vd_error_setg(errp, EINVAL, "'%s' is not in this backing file chain", top_node);
            return -EINVAL;
        }
    } else if (top_name) {
        top = vd_chain_find(dev, top_name);
        if (!top) {
            vd_error_setg(errp, EINVAL, "Top image file %s not found", top_name);
            return -EINVAL;
        }
    }
    BlockNode *base;
    if (base_node) {
        base = graph_find_node(base_node);
        if (!base) {
            vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", base_node,
                          base_node);
            return -EINVAL;
        }
        if (vd_chain_depth(top, base) < 0) {
            vd_error_setg(errp, EINVAL, "'%s' is not in this backing file chain", base_node);
            return -EINVAL;
        }
    } else if (base_name) {
        base = vd_chain_find(top, base_name);
        if (!base) {
            vd_error_setg(errp, EINVAL, "Can't find '%s' in the backing chain", base_name);
            return -EINVAL;
        }
    } else {
        base = vd_chain_bottom(top);
    }
    if (!base || base == top) {
        vd_error_setg(errp, EINVAL, "cannot commit an image into itself");
        return -EINVAL;
    }
    bool active = top == dev;
    if (active && backing_file) {
        vd_error_setg(errp, EINVAL, "'backing-file' specified, but 'top' is the active layer");
        return -EINVAL;
    }
    int64_t len = vd_getlength(top), blen = vd_getlength(base);
    if (len < 0 || blen < 0) {
        vd_error_setg(errp, EIO, "Could not inquire top image size");
        return -EIO;
    }
    if (blen < len) {
        /* QEMU grows the base; vdisk keeps images as they are and refuses instead. */
        vd_error_setg(errp, ENOTSUP, "Base '%s' is smaller than the top (%lld < %lld bytes)",
                      base->node_name, (long long)blen, (long long)len);
        return -ENOTSUP;
    }
    if (active && dev->read_only) {
        vd_error_setg(errp, EPERM, "Block node '%s' is read-only", device);
        return -EPERM;
    }

    Commit *c = calloc(1, sizeof(*c));
    if (!c) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    c->active = active;
    c->on_error = on_err;
    c->len = (uint64_t)len;
    c->dev = dev;
    vd_node_ref(dev);
    c->top = top;
    vd_node_ref(top);
    c->base = base;
    vd_node_ref(base);
    c->base_parent = chain_parent(dev, base);
    vd_node_ref(c->base_parent);
    if (!active) {
        c->above = chain_parent(dev, top);
        vd_node_ref(c->above);
        c->backing_name = backing_file ? strdup(backing_file)
                                       : vd_backing_name(c->above, base);
        c->backing_fmt = strdup(base->drv->name);
        if (!c->backing_name || !c->backing_fmt) {
            vd_error_setg(errp, ENOMEM, "Out of memory");
            commit_free_state(c);
            return -ENOMEM;
        }
    }
    c->tracker = block_tracker_get(top);
    if (!c->tracker || !c->base_parent || (!active && !c->above)) {
        int err = c->tracker ? EINVAL : ENOMEM;
        vd_error_setg(errp, err, c->tracker ? "Top '%s' is not above base" : "Out of memory",
                      top->node_name);
        commit_free_state(c);
        return -err;
    }
    /* Whole clusters of both images per copy (qcow2 COW inside one cluster), at least 64 KiB. */
    uint64_t g = block_tracker_granularity(c->tracker);
    uint32_t bcs = base->drv->cluster_size ? base->drv->cluster_size(base) : 0;
    g = bcs > g ? bcs : g;
    g = g < 65536 ? 65536 : g;
    c->gran = pow2_floor(g);
    /* Copy units of whole granules; copies in flight never share one (nor a base cluster). */
    uint64_t unit = copy_engine_default_unit();
    c->unit = unit < c->gran ? c->gran : unit / c->gran * c->gran;
    c->hook_tracker = active ? block_tracker_new(c->gran) : NULL;
    CopyEngineOptions eo = {.workers = copy_engine_default_workers(), .buf_size = c->unit,
                            .align = c->gran, .tracker = c->hook_tracker,
                            .kind = BT_SHARED, .fn = commit_copy_chunk, .opaque = c};
    /*
     * The copy yields to the guests' I/O: active, the top's exports' requests; non-active (no
     * range held), the device's.
     */
    c->dev_tracker = active ? NULL : block_tracker_get(dev);
    eo.guest = active ? c->tracker : c->dev_tracker;
    /* base's image (base_rw, opened below, shares its file name) reaches the disk early. */
    eo.writeback = copy_engine_writeback_node(base, &eo.writeback_every);
    c->engine = !active || c->hook_tracker ? copy_engine_new(&eo) : NULL;
    if (!c->engine) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        commit_free_state(c);
        return -ENOMEM;
    }
    int ret = blockops_claim(dev, "commit", errp);
    if (ret < 0) {
        commit_free_state(c);
        return ret;
    }
    c->claimed = true;
    ret = commit_journal_open(c, r, job_id, errp);
    if (ret < 0) {
        commit_free_state(c);
        return ret;
    }
    if (active || c->resumed) {
        c->nbits = (c->len + c->gran - 1) / c->gran;
        c->bitmap = calloc((c->nbits + 63) / 64 + 1, sizeof(uint64_t));
        if (!c->bitmap) {
            commit_journal_drop(c);
            vd_error_setg(errp, ENOMEM, "Out of memory");
            commit_free_state(c);
            return -ENOMEM;
        }
    }
    c->base_rw = vd_reopen(base, true, errp);
    if (!c->base_rw) {
        commit_journal_drop(c);
        commit_free_state(c);
        return -EIO;
    }
    /*
     * With the device's exports drained: put the writable base in the chain (one coherent node
     * for readers and the copy), and for an active commit start tracking guest writes before the
     * scan, so none is missed.
     */
    GraphDrained set; /* readers of base_parent's chain: everything above it */
    if (graph_drain_writers(c->base_parent, NULL, &set) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        commit_journal_drop(c);
        commit_free_state(c);
        return -ENOMEM;
    }
    VdWriteHook hook = {.tracker = c->hook_tracker, .before = commit_before_write,
                        .after = commit_after_write, .opaque = c};
    if (active && vd_write_hook_add(top, &hook) < 0) {
        graph_resume_writers(&set, NULL);
        vd_error_setg(errp, ENOMEM, "Cannot track guest writes");
        commit_journal_drop(c);
        commit_free_state(c);
        return -ENOMEM;
    }
    c->hooked = active;
    vd_node_set_backing(c->base_parent, c->base_rw);
    graph_replace_node(base, c->base_rw); /* one node per name, also while the job runs */
    c->base_swapped = true;
    graph_resume_writers(&set, NULL);

    JobOptions jo = {.id = job_id, .speed = speed, .auto_finalize = r->auto_finalize,
                     .auto_dismiss = r->auto_dismiss, .node = dev->node_name};
    Job *job = job_create(&commit_driver, &jo, c, errp);
    if (!job) {
        /* Put the read-only base back; base_rw holds nothing the chain above does not. */
        if (graph_drain_writers(c->base_parent, NULL, &set) == 0) {
            vd_node_set_backing(c->base_parent, c->base);
            graph_replace_node(c->base_rw, c->base);
            graph_resume_writers(&set, NULL);
        }
        commit_journal_drop(c);
        commit_free_state(c);
        return -EINVAL;
    }
    c->job = job;
    /* len from the start; an active commit's is what is dirty, known after its scan. */
    job_progress_set_remaining(job, active ? 1 : c->len);
    if (c->resumed) {
        job_user_pause(job, NULL); /* offered back PAUSED: job-resume continues it */
    }
    ret = job_start(job, errp);
    if (ret == 0 && c->resumed) {
        job_wait_paused(job);
    }
    return ret;
}

int commit_resume_journal(JobJournal *j, VdError **errp)
{
    json_t *req = json_object_get(job_journal_desc(j), "request");
    CommitRequest r = {.resume = j};
    json_error_t je;
    json_int_t speed = 0;
    json_t *bf = NULL;
    int fin = 0, dis = 0;
    if (json_unpack_ex(req, &je, 0, "{s:s, s:s, s:s, s:s, s:o, s:I, s:i, s:b, s:b}", "job-id",
                       &r.job_id, "device", &r.device, "top", &r.top, "base", &r.base,
                       "backing-file", &bf, "speed", &speed, "on-error", &r.on_error,
                       "auto-finalize", &fin, "auto-dismiss", &dis) < 0) {
        vd_error_setg(errp, EINVAL, "Job journal: %s", je.text);
        return -EINVAL;
    }
    r.backing_file = json_string_value(bf); /* null: active */
    r.speed = speed;
    r.auto_finalize = fin;
    r.auto_dismiss = dis;
    return commit_request_start(&r, errp);
}
