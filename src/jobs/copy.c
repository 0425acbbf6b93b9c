/*
 * copy.c - the block jobs' copy engine (see copy.h for the API and the ordering invariant).
 *
 * Why threads: every vd_* call is synchronous, so N requests in flight need N threads. A job gets
 * its own small set (mirror: 4 by default, from buf-size / the copy unit) rather than a shared
 * pool: a job's workers block only on its own ranges and its own images, a paused or stopped job
 * holds no thread another job waits for, and the number of copies competing with guest requests
 * for the CPU stays bounded per job. Idle workers sleep on a condition variable.
 *
 * Why the invariant holds with N copies in flight. Take a guest write W to a range R and a copy C
 * of (part of) R, both on the same tracker, W exclusive:
 *  - W began before C: C's begin waits until W ended. The job's dirty bit for R was set by W (or W
 *    wrote the destination itself) before W ended, and C clears the bits only after its begin, so
 *    C reads W's data (or, for stream, re-checks the top's allocation and skips R).
 *  - C began before W: W waits until C ended, i.e. until C's write to the destination completed;
 *    W's data then reaches the destination after it (write-blocking / stream), or W re-dirties R
 *    and a later copy takes it.
 * A later copy C' of R cannot overtake C: the coordinator never submits a chunk that overlaps one
 * in flight (compared widened to `align`, at least the destination's cluster), and C stays "in
 * flight" until the coordinator reaped it. So per range, copies and guest writes are totally
 * ordered, whatever the number of workers.
 */
#include "jobs/copy.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "util/lock.h"
#include "util/thread-cache.h"

/* Early writeback of the destination's file every 8 MiB copied (copy_engine_writeback_node). */
#define DEFAULT_WRITEBACK_BYTES (8ULL << 20)

/* Guest priority: the budget's floor (share of the time a copy may run while the guest is busy). */
#define DEFAULT_GUEST_FLOOR 0.10
#define BUDGET_START_SHARE 0.5
/*
 * The guest is hurt when its mean latency exceeds this times its low-water mark (the share
 * halves); the share grows below halfway between 1 and this. 2.0 kept an uncapped guest right at
 * the 2x bound (measured 2.1x mean, 47 % of its IOPS during a full mirror); 1.5 leaves it
 * a margin. VDISK_COPY_GUEST_HURT (percent, 110..1000) overrides it for A/B measurements.
 */
#define DEFAULT_GUEST_HURT 1.5
#define BUDGET_MAX_GAP_NS 1000000000ULL /* a pause after one slow copy never exceeds this */
#define BUDGET_MAX_SHARE 64.0 /* above 1: copies in flight (capped by the workers), no pause */

typedef enum { SLOT_FREE, SLOT_QUEUED, SLOT_RUNNING, SLOT_DONE } SlotState;

typedef struct Slot {
    SlotState state;
    uint64_t seq;          /* submission order: workers take the oldest queued */
    uint64_t start, end;   /* widened to align, for clip */
    CopyChunk c;
} Slot;

struct CopyEngine {
    CopyEngineOptions o;
    pthread_mutex_t lock;
    pthread_cond_t work_cond;   /* workers: a slot was queued, or stop */
    pthread_cond_t done_cond;   /* coordinator: a slot is done, or kicked */
    Slot *slots;
    uint8_t **bufs;
    pthread_t *threads;
    unsigned nthreads;          /* started */
    unsigned in_flight;         /* slots not FREE */
    uint64_t next_seq;
    bool stop;
    bool kicked;                /* for copy_engine_take_kick */
    bool wake;                  /* interrupts a waiting reap */
    uint64_t kick_gen;          /* bumped by kick: ends a worker's pacing wait */
    /* guest priority (docs/guest-priority.md), under lock */
    BlockTracker *guest;        /* whose requests are the guest's; NULL: no pacing */
    bool urgent;                /* copy_engine_set_urgent: no pacing */
    bool converge;              /* the floor rises while the job loses ground (note_dirty) */
    CopyBudget budget;
    uint64_t win_start;         /* current window: start, the guest's totals at its start */
    uint64_t win_ended, win_lat;
    uint64_t last_end_ns, last_copy_ns; /* the last copy: when it ended, how long it ran */
    /* convergence (copy_engine_note_dirty): the progress window's start, dirty set, copies */
    uint64_t prog_start, prog_dirty, prog_copied;
    bool prog_started;
#ifndef NDEBUG
    /* VDISK_TEST_COPY_PACE_MS (test hook): tracked copies start this far apart, test_pace_locked */
    uint64_t test_pace_ns, test_next_ns;
#endif
    /* early writeback (coordinator only, but wb_running is atomic) */
    uint64_t wb_pending;
    pthread_t wb_thread;
    bool wb_started;
    bool wb_running;
};

static void *wb_main(void *arg)
{
    CopyEngine *e = arg;
    vd_thread_name("copy-wb");
    /*
     * Start the writeback, do not sync: the fdatasync every 256 MiB this once made wrote 256 MiB
     * at once and committed the journal, and a guest reading that file meanwhile (an active
     * commit's copy-on-write reads base) waited for all of it: 28-224 ms preads ending with the
     * sync, measured (docs/guest-priority.md). Only nodes that can start one get here
     * (copy_engine_writeback_node).
     */
    (void)vd_start_writeback(e->o.writeback);
    __atomic_store_n(&e->wb_running, false, __ATOMIC_RELEASE);
    return NULL;
}

static void wb_join(CopyEngine *e)
{
    if (e->wb_started) {
        pthread_join(e->wb_thread, NULL);
        e->wb_started = false;
    }
}

/* A finished copy wrote `bytes`: start a writeback of the destination every writeback_every. */
static void wb_account(CopyEngine *e, uint64_t bytes)
{
    if (!e->o.writeback || !e->o.writeback_every) {
        return;
    }
    e->wb_pending += bytes;
    if (e->wb_pending < e->o.writeback_every ||
        __atomic_load_n(&e->wb_running, __ATOMIC_ACQUIRE)) {
        return;
    }
    wb_join(e);
    e->wb_pending = 0;
    __atomic_store_n(&e->wb_running, true, __ATOMIC_RELEASE);
    if (pthread_create(&e->wb_thread, NULL, wb_main, e) == 0) {
        e->wb_started = true;
    } else {
        __atomic_store_n(&e->wb_running, false, __ATOMIC_RELEASE);
    }
}

static uint64_t now_ns(void)
{
    return job_now_ns();
}

/* ---- guest priority: the budget (pure) ---- */

void copy_budget_init(CopyBudget *b, double floor)
{
    memset(b, 0, sizeof(*b));
    b->floor = floor > 0.01 ? (floor < 1 ? floor : 1) : 0.01;
    b->base_floor = b->floor;
    b->share = BUDGET_START_SHARE > b->floor ? BUDGET_START_SHARE : b->floor;
    b->hurt = DEFAULT_GUEST_HURT;
}

void copy_budget_update(CopyBudget *b, const CopyWindow *w)
{
    b->guest_active = w->guest_done > 0 || w->guest_in_flight > 0;
    if (!b->guest_active) {
        return; /* the share is kept for the guest's next burst */
    }
    if (w->guest_done == 0) {
        /* Requests in flight a whole window without one finishing: the guest is stalled. */
        b->share = b->share / 2 > b->floor ? b->share / 2 : b->floor;
        return;
    }
    uint64_t mean = w->guest_lat_ns / w->guest_done;
    mean = mean ? mean : 1;
    /* Low-water mark of the guest's latency, drifting up ~5 %/s so a slower machine is learnt. */
    if (b->ref_ns == 0 || mean < b->ref_ns) {
        b->ref_ns = mean;
    } else {
        b->ref_ns += b->ref_ns / 1024 + 1;
    }
    if ((double)mean > b->hurt * (double)b->ref_ns) {
        b->share = b->share / 2 > b->floor ? b->share / 2 : b->floor;
    } else if (2 * (double)mean < (1 + b->hurt) * (double)b->ref_ns) {
        /* Below one copy: +1/20 of the time; above: +1/20 of a copy in flight. */
        b->share = b->share + 0.05 < BUDGET_MAX_SHARE ? b->share + 0.05 : BUDGET_MAX_SHARE;
    }
}

unsigned copy_budget_allowed(const CopyBudget *b, unsigned workers)
{
    workers = workers ? workers : 1;
    if (!b->guest_active || b->share >= workers) {
        return workers;
    }
    /* An unhurt guest lets the share grow past one copy: floor(share) in flight, at least 1. */
    return b->share >= 2 ? (unsigned)b->share : 1;
}

uint64_t copy_budget_gap_ns(const CopyBudget *b, uint64_t copy_ns)
{
    if (!b->guest_active || b->share >= 1 || b->behind) {
        return 0;
    }
    double gap = (double)copy_ns * (1 - b->share) / b->share;
    return gap > (double)BUDGET_MAX_GAP_NS ? BUDGET_MAX_GAP_NS : (uint64_t)gap;
}

void copy_budget_dirty(CopyBudget *b, uint64_t dirty)
{
    b->caught_up = b->caught_up || dirty <= COPY_CONVERGED_BYTES;
    b->behind = b->caught_up && dirty > COPY_KEEPUP_BYTES;
}

void copy_budget_progress(CopyBudget *b, uint64_t dirty0, uint64_t dirty1, uint64_t copied,
                          unsigned workers)
{
    if (dirty1 <= COPY_CONVERGED_BYTES) {
        b->floor = b->base_floor; /* keeping up: the guest gets its priority back */
        return;
    }
    uint64_t gained = dirty0 > dirty1 ? dirty0 - dirty1 : 0;
    /* No copy ended in the window (one long copy, or its gap): losing only if the set grew. */
    bool losing = copied ? gained < copied / 2 : dirty1 > dirty0;
    if (!losing) {
        return; /* gaining at least half of what it copies: it converges at this floor */
    }
    double cap = workers ? workers : 1;
    b->floor = 2 * b->floor < cap ? 2 * b->floor : cap;
    b->share = b->share > b->floor ? b->share : b->floor;
    b->raised++;
}

/* ---- guest priority: feeding the budget and pacing the workers (engine lock held) ---- */

/* Close the window if it is over: what the guest did in it updates the budget. */
static void budget_tick_locked(CopyEngine *e, uint64_t now)
{
    if (!e->guest || now - e->win_start < COPY_WINDOW_NS) {
        return;
    }
    /*
     * The tracker's lock is a leaf taken after ours (it never calls back into the engine). Our
     * copies are not in its stats (block_tracker_begin_job). Subtracting them afterwards, as
     * before, raced with a copy that had ended in the tracker but not yet here: a window then
     * lost a whole copy's latency (100+ ms under ASan), read as a guest mean of ~0, and the
     * low-water mark fell to ~1 ns, so every later window looked hurt and the share sat at the
     * floor for minutes.
     */
    uint64_t ended, lat;
    unsigned in_flight;
    block_tracker_stats(e->guest, &ended, &lat, &in_flight);
    CopyWindow w = {.guest_done = ended - e->win_ended, .guest_lat_ns = lat - e->win_lat,
                    .guest_in_flight = in_flight};
    copy_budget_update(&e->budget, &w);
    e->win_start = now;
    e->win_ended = ended;
    e->win_lat = lat;
}

/*
 * A worker about to run a tracked copy: while the guest is active, wait until the last copy's
 * run time is followed by its gap (the budget's share of the time). Woken early by stop, kick
 * (a verb: the coordinator drains and must not wait for the pacing) and urgency; re-evaluated
 * every window, so a guest that goes idle releases it at once.
 */
static void pace_locked(CopyEngine *e)
{
    if (!e->guest) {
        return;
    }
    uint64_t kick0 = e->kick_gen;
    for (;;) {
        uint64_t now = now_ns();
        budget_tick_locked(e, now);
        if (e->stop || e->urgent || e->kick_gen != kick0) {
            return;
        }
        uint64_t at = e->last_end_ns + copy_budget_gap_ns(&e->budget, e->last_copy_ns);
        if (now >= at) {
            return;
        }
        uint64_t until = at - now < COPY_WINDOW_NS ? at : now + COPY_WINDOW_NS;
        struct timespec ts = {.tv_sec = (time_t)(until / 1000000000ULL),
                              .tv_nsec = (long)(until % 1000000000ULL)};
        vd_cond_timedwait(&e->work_cond, &e->lock, &ts);
    }
}

#ifndef NDEBUG
/*
 * Test hook: VDISK_TEST_COPY_PACE_MS=N makes each tracked copy start at least N ms after the
 * previous one started, as the guest-priority pacing can hold a submitted chunk in its worker
 * before the job's copy function sees it (tests/integration/jobs/test_jobs_resume_kill.py: a
 * journal must not call such a chunk's range copied). nbdkit's delay filter cannot widen that
 * gap: it delays the copy's I/O, after the job has marked the range. It ships in vdiskd (the
 * default debugoptimized build does not define NDEBUG; only -Db_ndebug=true leaves it out), and
 * does nothing unless the variable is set.
 */
static void test_pace_locked(CopyEngine *e)
{
    if (!e->test_pace_ns) {
        return;
    }
    uint64_t now = now_ns();
    uint64_t at = e->test_next_ns > now ? e->test_next_ns : now;
    e->test_next_ns = at + e->test_pace_ns;
    while (!e->stop && (now = now_ns()) < at) {
        struct timespec ts = {.tv_sec = (time_t)(at / 1000000000ULL),
                              .tv_nsec = (long)(at % 1000000000ULL)};
        vd_cond_timedwait(&e->work_cond, &e->lock, &ts);
    }
}
#else
static void test_pace_locked(CopyEngine *e)
{
    (void)e;
}
#endif

typedef struct WorkerArg {
    CopyEngine *e;
    unsigned idx;
} WorkerArg;

static void *worker_main(void *arg)
{
    WorkerArg *wa = arg;
    CopyEngine *e = wa->e;
    uint8_t *buf = e->bufs[wa->idx];
    vd_thread_name("copy/%u", wa->idx);
    free(wa);
    const char *ns = getenv("VDISK_COPY_NICE");
    int nice_v = ns ? atoi(ns) : 0;
    if (nice_v > 0 && nice_v <= 19) {
        /* Linux: a thread's own nice value (per-thread scheduling entity). */
        (void)setpriority(PRIO_PROCESS, (id_t)gettid(), nice_v);
    }
    vd_mutex_lock(&e->lock);
    for (;;) {
        Slot *s = NULL;
        for (unsigned i = 0; i < e->o.workers; i++) {
            Slot *t = &e->slots[i];
            if (t->state == SLOT_QUEUED && (!s || t->seq < s->seq)) {
                s = t;
            }
        }
        if (!s) {
            if (e->stop) {
                break;
            }
            vd_cond_wait(&e->work_cond, &e->lock);
            continue;
        }
        s->state = SLOT_RUNNING;
        CopyChunk c = s->c;
        if (c.tracked) {
            pace_locked(e);
            test_pace_locked(e);
        }
        vd_mutex_unlock(&e->lock);

        BtRequest req;
        uint64_t t0 = now_ns();
        if (c.tracked && e->o.tracker) {
            block_tracker_begin_job(e->o.tracker, &req, c.off, c.bytes, e->o.kind);
        }
        c.ret = 0;
        c.is_read = false;
        c.copied = 0;
        e->o.fn(e->o.opaque, &c, buf, e->o.buf_size);
        if (c.tracked && e->o.tracker) {
            block_tracker_end(e->o.tracker, &req);
        }
        uint64_t t1 = now_ns();

        vd_mutex_lock(&e->lock);
        if (c.tracked) {
            e->last_end_ns = t1;
            e->last_copy_ns = t1 - t0;
            e->prog_copied += c.ret == 0 ? c.bytes : 0;
        }
        s->c = c;
        s->state = SLOT_DONE;
        vd_cond_broadcast(&e->done_cond);
    }
    vd_mutex_unlock(&e->lock);
    return NULL;
}

CopyEngine *copy_engine_new(const CopyEngineOptions *o)
{
    CopyEngine *e = calloc(1, sizeof(*e));
    if (!e) {
        return NULL;
    }
    e->o = *o;
    if (e->o.workers == 0) {
        e->o.workers = 1;
    }
    if (e->o.align == 0) {
        e->o.align = 1;
    }
#ifndef NDEBUG
    const char *tp = getenv("VDISK_TEST_COPY_PACE_MS");
    e->test_pace_ns = tp ? strtoull(tp, NULL, 0) * 1000000ULL : 0;
#endif
    pthread_mutex_init(&e->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* pace_locked's deadlines */
    pthread_cond_init(&e->work_cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&e->done_cond, NULL);
    e->slots = calloc(e->o.workers, sizeof(*e->slots));
    e->bufs = calloc(e->o.workers, sizeof(*e->bufs));
    e->threads = calloc(e->o.workers, sizeof(*e->threads));
    if (!e->slots || !e->bufs || !e->threads) {
        copy_engine_free(e);
        return NULL;
    }
    for (unsigned i = 0; i < e->o.workers; i++) {
        e->bufs[i] = malloc(e->o.buf_size);
        if (!e->bufs[i]) {
            copy_engine_free(e);
            return NULL;
        }
    }
    for (unsigned i = 0; i < e->o.workers; i++) {
        WorkerArg *wa = malloc(sizeof(*wa));
        if (!wa) {
            break;
        }
        wa->e = e;
        wa->idx = i;
        if (pthread_create(&e->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            break;
        }
        e->nthreads++;
    }
    if (e->nthreads == 0) {
        copy_engine_free(e);
        return NULL;
    }
    /* Fewer threads than asked (EAGAIN): fewer requests in flight, still correct. */
    e->o.workers = e->nthreads;
    /* VDISK_COPY_GUEST_PRIORITY=0: no pacing (A/B benchmarks); VDISK_COPY_GUEST_FLOOR: percent. */
    const char *gp = getenv("VDISK_COPY_GUEST_PRIORITY");
    e->guest = gp && !strcmp(gp, "0") ? NULL : o->guest ? o->guest : o->tracker;
    const char *fl = getenv("VDISK_COPY_GUEST_FLOOR");
    long pct = fl ? strtol(fl, NULL, 0) : 0;
    copy_budget_init(&e->budget, pct >= 1 && pct <= 100 ? pct / 100.0 : DEFAULT_GUEST_FLOOR);
    /* VDISK_COPY_GUEST_CONVERGE=0: the floor stays fixed (A/B measurements of the rule). */
    const char *cv = getenv("VDISK_COPY_GUEST_CONVERGE");
    e->converge = !(cv && !strcmp(cv, "0"));
    const char *hu = getenv("VDISK_COPY_GUEST_HURT");
    long hpct = hu ? strtol(hu, NULL, 0) : 0;
    if (hpct >= 110 && hpct <= 1000) {
        e->budget.hurt = hpct / 100.0;
    }
    e->win_start = now_ns();
    if (e->guest) {
        unsigned in_flight;
        block_tracker_stats(e->guest, &e->win_ended, &e->win_lat, &in_flight);
    }
    return e;
}

void copy_engine_free(CopyEngine *e)
{
    if (!e) {
        return;
    }
    vd_mutex_lock(&e->lock);
    e->stop = true;
    vd_cond_broadcast(&e->work_cond);
    vd_mutex_unlock(&e->lock);
    /* Workers finish what is queued, then exit: nothing is left half done. */
    for (unsigned i = 0; i < e->nthreads; i++) {
        pthread_join(e->threads[i], NULL);
    }
    wb_join(e);
    if (e->bufs) {
        for (unsigned i = 0; i < e->o.workers; i++) {
            free(e->bufs[i]);
        }
    }
    free(e->bufs);
    free(e->threads);
    free(e->slots);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->work_cond);
    pthread_cond_destroy(&e->done_cond);
    free(e);
}

unsigned copy_engine_in_flight(CopyEngine *e)
{
    vd_mutex_lock(&e->lock);
    unsigned n = e->in_flight;
    vd_mutex_unlock(&e->lock);
    return n;
}

uint64_t copy_engine_low_water(CopyEngine *e, uint64_t pos)
{
    vd_mutex_lock(&e->lock);
    for (unsigned i = 0; i < e->o.workers; i++) {
        const Slot *s = &e->slots[i];
        if ((s->state == SLOT_QUEUED || s->state == SLOT_RUNNING) && s->c.off < pos) {
            pos = s->c.off;
        }
    }
    vd_mutex_unlock(&e->lock);
    return pos;
}

unsigned copy_engine_max_in_flight(CopyEngine *e)
{
    return e->o.workers;
}

unsigned copy_engine_allowed(CopyEngine *e)
{
    vd_mutex_lock(&e->lock);
    unsigned n = e->o.workers;
    if (e->guest && !e->urgent) {
        budget_tick_locked(e, now_ns());
        n = copy_budget_allowed(&e->budget, e->o.workers);
    }
    vd_mutex_unlock(&e->lock);
    return n;
}

void copy_engine_note_dirty(CopyEngine *e, uint64_t dirty)
{
    uint64_t now = now_ns();
    vd_mutex_lock(&e->lock);
    bool was_behind = e->budget.behind;
    if (e->guest && e->converge) {
        copy_budget_dirty(&e->budget, dirty);
        if (e->budget.behind && !was_behind) {
            vd_cond_broadcast(&e->work_cond); /* a pacing worker goes now */
        }
    }
    if (!e->prog_started || now - e->prog_start >= COPY_PROGRESS_NS) {
        if (e->prog_started && e->guest && e->converge && !e->urgent) {
            double floor0 = e->budget.floor;
            copy_budget_progress(&e->budget, e->prog_dirty, dirty, e->prog_copied, e->o.workers);
            if (e->budget.floor > floor0) {
                vd_cond_broadcast(&e->work_cond); /* a pacing worker re-reads its gap */
            }
        }
        e->prog_started = true;
        e->prog_start = now;
        e->prog_dirty = dirty;
        e->prog_copied = 0;
    }
    vd_mutex_unlock(&e->lock);
}

void copy_engine_set_urgent(CopyEngine *e)
{
    vd_mutex_lock(&e->lock);
    e->urgent = true;
    vd_cond_broadcast(&e->work_cond);
    vd_mutex_unlock(&e->lock);
}

uint64_t copy_engine_clip(CopyEngine *e, uint64_t start, uint64_t end, uint64_t *skip_to)
{
    uint64_t a = e->o.align;
    uint64_t ws = start & ~(a - 1);
    uint64_t we = end > UINT64_MAX - (a - 1) ? UINT64_MAX : (end + a - 1) & ~(a - 1);
    vd_mutex_lock(&e->lock);
    for (unsigned i = 0; i < e->o.workers; i++) {
        Slot *s = &e->slots[i];
        if (s->state == SLOT_FREE) {
            continue;
        }
        if (ws < s->end && s->start < we) {
            if (s->start <= ws) {
                if (skip_to) {
                    *skip_to = s->end;
                }
                vd_mutex_unlock(&e->lock);
                return 0;
            }
            /* s starts inside (start, end): stop before it (s->start is aligned, > ws). */
            end = s->start < end ? s->start : end;
            we = end;
        }
    }
    vd_mutex_unlock(&e->lock);
    return end > start ? end : 0;
}

void copy_engine_submit(CopyEngine *e, uint64_t off, uint64_t bytes, bool tracked)
{
    uint64_t a = e->o.align;
    vd_mutex_lock(&e->lock);
    for (unsigned i = 0; i < e->o.workers; i++) {
        Slot *s = &e->slots[i];
        if (s->state != SLOT_FREE) {
            continue;
        }
        s->state = SLOT_QUEUED;
        s->seq = e->next_seq++;
        s->start = off & ~(a - 1);
        uint64_t end = off + bytes;
        s->end = end > UINT64_MAX - (a - 1) ? UINT64_MAX : (end + a - 1) & ~(a - 1);
        memset(&s->c, 0, sizeof(s->c));
        s->c.off = off;
        s->c.bytes = bytes;
        s->c.tracked = tracked;
        e->in_flight++;
        /* Broadcast: a worker pacing on this condition must not swallow the wake-up. */
        vd_cond_broadcast(&e->work_cond);
        break;
    }
    vd_mutex_unlock(&e->lock);
}

bool copy_engine_reap(CopyEngine *e, CopyChunk *out, bool wait)
{
    vd_mutex_lock(&e->lock);
    for (;;) {
        Slot *s = NULL;
        for (unsigned i = 0; i < e->o.workers; i++) {
            Slot *t = &e->slots[i];
            if (t->state == SLOT_DONE && (!s || t->seq < s->seq)) {
                s = t;
            }
        }
        if (s) {
            *out = s->c;
            s->state = SLOT_FREE;
            e->in_flight--;
            vd_mutex_unlock(&e->lock);
            if (out->ret == 0 && out->copied) {
                wb_account(e, out->copied);
            }
            return true;
        }
        if (!wait || e->in_flight == 0 || e->wake) {
            e->wake = false;
            vd_mutex_unlock(&e->lock);
            return false;
        }
        vd_cond_wait(&e->done_cond, &e->lock);
    }
}

void copy_engine_kick(CopyEngine *e)
{
    if (!e) {
        return;
    }
    vd_mutex_lock(&e->lock);
    e->kicked = true;
    e->wake = true;
    e->kick_gen++;
    vd_cond_broadcast(&e->done_cond);
    vd_cond_broadcast(&e->work_cond); /* ends a pacing wait */
    vd_mutex_unlock(&e->lock);
}

bool copy_engine_take_kick(CopyEngine *e)
{
    vd_mutex_lock(&e->lock);
    bool k = e->kicked;
    e->kicked = false;
    vd_mutex_unlock(&e->lock);
    return k;
}

void copy_engine_drain(CopyEngine *e, void (*cb)(void *opaque, const CopyChunk *c), void *opaque)
{
    CopyChunk c;
    while (copy_engine_in_flight(e) > 0) {
        if (copy_engine_reap(e, &c, true) && cb) {
            cb(opaque, &c);
        }
    }
}

void copy_engine_wait_writeback(CopyEngine *e)
{
    wb_join(e);
}

BlockNode *copy_engine_writeback_node(BlockNode *dst, uint64_t *every)
{
    BlockNode *f = dst ? dst->file : NULL;
    /*
     * Only a file can start its writeback without a sync. Others get no background flush: it
     * was a sync (what the guest waited for, above), null-co has nothing to write, and a
     * blkdebug flush rule must see the job's own flushes, not one of ours (its error lost).
     */
    if (!f || !f->drv->is_protocol || f->drv->may_block || !f->drv->start_writeback ||
        (f->open_flags & VD_OPEN_NO_FLUSH) || (dst->open_flags & VD_OPEN_NO_FLUSH)) {
        *every = 0;
        return NULL;
    }
    const char *s = getenv("VDISK_COPY_WRITEBACK");
    *every = s ? strtoull(s, NULL, 0) : DEFAULT_WRITEBACK_BYTES;
    return *every ? f : NULL;
}

/* Defaults; VDISK_COPY_WORKERS / VDISK_COPY_UNIT override them (benchmarks, tuning). */
#define DEFAULT_WORKERS 4
#define DEFAULT_UNIT (1ULL << 20)

unsigned copy_engine_default_workers(void)
{
    const char *s = getenv("VDISK_COPY_WORKERS");
    long v = s ? strtol(s, NULL, 0) : 0;
    return v >= 1 && v <= 64 ? (unsigned)v : DEFAULT_WORKERS;
}

uint64_t copy_engine_default_unit(void)
{
    const char *s = getenv("VDISK_COPY_UNIT");
    long long v = s ? strtoll(s, NULL, 0) : 0;
    return v >= 4096 && v <= (64LL << 20) && !(v & (v - 1)) ? (uint64_t)v : DEFAULT_UNIT;
}

/* ---- linear sweep (stream, non-active commit) ---- */

typedef struct SweepState {
    CopySweep *sw;
    CopyChunk *failed;     /* failures of the current batch (at most the workers) */
    unsigned nfailed;
    uint64_t to_account;
} SweepState;

static void sweep_reaped(void *opaque, const CopyChunk *c)
{
    SweepState *st = opaque;
    if (c->ret < 0) {
        st->failed[st->nfailed++] = *c;
        return;
    }
    job_progress_update(st->sw->job, c->bytes);
    if (c->copied && job_get_speed(st->sw->job)) {
        st->to_account += c->copied;
    }
}

static int chunk_cmp(const void *a, const void *b)
{
    const CopyChunk *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

int copy_sweep_run(CopySweep *sw)
{
    CopyEngine *e = sw->engine;
    unsigned nw = copy_engine_max_in_flight(e);
    CopyChunk *failed = calloc(nw, sizeof(*failed));
    CopyChunk *retry = calloc(nw, sizeof(*retry));
    if (!failed || !retry) {
        free(failed);
        free(retry);
        return -ENOMEM;
    }
    SweepState st = {.sw = sw, .failed = failed};
    unsigned nretry = 0;
    uint64_t off = 0;
    int r = 0;
    sw->ignored = 0;
    for (;;) {
        CopyChunk c;
        while (copy_engine_reap(e, &c, false)) {
            sweep_reaped(&st, &c);
        }
        if (sw->tick) {
            sw->tick(sw->opaque, copy_engine_low_water(e, off));
        }
        uint64_t speed = job_get_speed(sw->job);
        if (copy_engine_take_kick(e) || st.nfailed || speed) {
            copy_engine_drain(e, sweep_reaped, &st);
        }
        if (copy_engine_in_flight(e) == 0) {
            /* A quiet point, as between two copies of a serial loop. */
            if (st.to_account) {
                job_rate_limit(sw->job, st.to_account);
                st.to_account = 0;
            }
            if (st.nfailed) {
                qsort(failed, st.nfailed, sizeof(*failed), chunk_cmp);
                for (unsigned i = 0; i < st.nfailed && r == 0; i++) {
                    JobErrorAction a = job_handle_io_error(sw->job, sw->on_error, failed[i].is_read,
                                                           failed[i].ret);
                    if (a == JOB_ERR_STOP) {
                        job_pause_point(sw->job);
                        for (unsigned k = i; k < st.nfailed; k++) {
                            retry[nretry++] = failed[k]; /* retried once resumed */
                        }
                        break;
                    }
                    if (!sw->ignored) {
                        sw->ignored = failed[i].ret;
                    }
                    if (a == JOB_ERR_REPORT) {
                        r = failed[i].ret;
                        sw->failed_is_read = failed[i].is_read;
                        break;
                    }
                    job_progress_update(sw->job, failed[i].bytes); /* ignored: skipped */
                }
                st.nfailed = 0;
                if (r < 0) {
                    break;
                }
            }
            job_pause_point(sw->job);
            if (job_is_cancelled(sw->job)) {
                r = -ECANCELED;
                break;
            }
        }
        unsigned max_in_flight = speed ? 1 : copy_engine_allowed(e);
        if (copy_engine_in_flight(e) < max_in_flight && (nretry || off < sw->len)) {
            if (nretry) {
                c = retry[0];
                memmove(retry, retry + 1, --nretry * sizeof(*retry));
                copy_engine_submit(e, c.off, c.bytes, true);
                continue;
            }
            uint64_t chunk = sw->unit;
            if (speed && speed / 10 < chunk) {
                chunk = speed / 10; /* one 100 ms slice per copy: the limit stays smooth */
            }
            chunk = chunk / sw->align * sw->align;
            chunk = chunk ? chunk : sw->align;
            uint64_t n = sw->len - off < chunk ? sw->len - off : chunk;
            uint64_t skip = sw->skip ? sw->skip(sw->opaque, off, sw->len - off) : 0;
            skip = skip > sw->len - off ? sw->len - off : skip;
            if (skip && off + skip < sw->len) {
                skip = skip / sw->align * sw->align; /* chunks stay aligned */
            }
            if (skip) {
                job_progress_update(sw->job, skip);
                off += skip;
                continue;
            }
            copy_engine_submit(e, off, n, true);
            off += n;
            continue;
        }
        if (copy_engine_in_flight(e) > 0) {
            if (copy_engine_reap(e, &c, true)) {
                sweep_reaped(&st, &c);
            }
            continue;
        }
        if (off >= sw->len && nretry == 0 && st.nfailed == 0) {
            break;
        }
    }
    copy_engine_drain(e, NULL, NULL);
    wb_join(e);
    free(failed);
    free(retry);
    return r;
}

BlockNode *copy_read_layer(BlockNode *top, BlockNode *layer, uint64_t offset, uint64_t bytes)
{
    if (!layer || layer == top) {
        return top;
    }
    int64_t l = vd_getlength(layer);
    return l >= 0 && offset + bytes <= (uint64_t)l ? layer : top;
}
