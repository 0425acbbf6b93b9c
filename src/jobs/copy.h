/*
 * copy.h - the copy engine shared by mirror, stream and commit: a job's coordinator thread picks
 * ranges to copy and submits them; a few worker threads (one per request in flight) run them, each
 * holding its range in a block tracker around the job's copy function.
 *
 * Ordering invariant (see copy.c for the argument): a background copy of old data never lands on
 * the destination after a guest's newer write to that range, with any number of copies in flight:
 *  1. every copy runs entirely inside its tracker range (begin before the first read of the source
 *     and before the job clears the range's dirty bits; end after the last write): BT_SHARED where
 *     guest writes are BT_EXCLUSIVE on the same tracker (mirror, active commit), BT_EXCLUSIVE where
 *     the guest writes the copy's destination itself (stream);
 *  2. no two copies in flight overlap, after widening both to the engine's alignment (the
 *     destination's cluster / the job's granularity): so copies of one range happen one after the
 *     other, never race inside one destination cluster, and an older copy cannot finish after a
 *     newer one;
 *  3. the worker that begins a tracker range is the one that does the I/O and ends it (tracker FIFO
 *     rule: no deadlock, no starvation of guest requests).
 *
 * Threads: only the coordinator (the job thread, or the QMP thread in prepare once run returned:
 * one at a time) calls submit/reap/drain/find; kick may come from any thread. The engine's lock is a
 * leaf: job_* and vd_* are never called with it held (the copy function runs without it).
 */
#ifndef VDISK_JOBS_COPY_H
#define VDISK_JOBS_COPY_H

#include <stdbool.h>
#include <stdint.h>

#include "block/tracking.h"
#include "jobs/job.h"

typedef struct CopyEngine CopyEngine;

/* One copy request: in (off, bytes, tracked) and out (ret, is_read, copied). */
typedef struct CopyChunk {
    uint64_t off, bytes;
    bool tracked;      /* the engine holds [off, off+bytes) in its tracker around the function */
    int ret;           /* 0 or -errno */
    bool is_read;      /* on error: the source (true) or the destination (false) failed */
    uint64_t copied;   /* bytes the function actually wrote (rate limit, stream/commit) */
} CopyChunk;

/*
 * The job's copy of one chunk, on a worker thread, inside the tracker range when c->tracked.
 * buf holds buf_size bytes. Sets c->ret, c->is_read, c->copied.
 */
typedef void CopyChunkFn(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size);

typedef struct CopyEngineOptions {
    unsigned workers;      /* threads = most requests in flight (>= 1) */
    uint64_t buf_size;     /* per-worker buffer: the largest chunk */
    uint64_t align;        /* power of two: in-flight ranges are compared widened to it */
    BlockTracker *tracker; /* held around tracked chunks (NULL: none) */
    BtKind kind;
    CopyChunkFn *fn;
    void *opaque;
    /*
     * Early writeback: every writeback_every bytes written by finished copies, a helper thread
     * starts the writeback of `writeback` (the destination's protocol node: vd_start_writeback,
     * no sync, no format lock, copies go on; nothing where the driver cannot), so the disk writes
     * while the job copies and the job's final flush (which alone makes the copy durable) finds
     * little left. NULL / 0 = off.
     */
    BlockNode *writeback;
    uint64_t writeback_every;
    /*
     * Guest priority (docs/guest-priority.md): the tracker whose requests are the guest's (NULL:
     * `tracker`; non-active commit holds no range but watches the device's). NULL and no tracker:
     * no pacing.
     */
    BlockTracker *guest;
} CopyEngineOptions;

CopyEngine *copy_engine_new(const CopyEngineOptions *o);
/* Waits for the requests in flight, stops and joins the workers. NULL is a no-op. */
void copy_engine_free(CopyEngine *e);

/* Requests submitted and not reaped yet. */
unsigned copy_engine_in_flight(CopyEngine *e);
unsigned copy_engine_max_in_flight(CopyEngine *e);
/*
 * min(pos, the offset of every request queued or being copied): below it every submitted request
 * has finished (reaped or not). A queued request has not reached the caller's copy function yet,
 * so nothing of it is known to the caller.
 */
uint64_t copy_engine_low_water(CopyEngine *e, uint64_t pos);
/*
 * Guest priority (docs/guest-priority.md): how many copies may be in flight now. All workers while
 * the guest is idle; one while it is active, which the worker paces to the budget's share of the
 * time (copy_budget_*). Never 0: the copy always converges.
 */
unsigned copy_engine_allowed(CopyEngine *e);
/* The user asked to finish (complete, soft cancel): copies run unpaced until the engine is freed. */
void copy_engine_set_urgent(CopyEngine *e);
/*
 * The coordinator's dirty set (active commit: bytes still to copy), reported on every turn of its
 * loop: it drives the convergence floor (copy_budget_progress). Jobs that copy a fixed range once
 * (stream, non-active commit) converge at any share; a mirror converges by switching itself to
 * write-blocking (docs/guest-priority.md says why it does not call this).
 */
void copy_engine_note_dirty(CopyEngine *e, uint64_t dirty);

/*
 * The guest-priority budget, a pure state machine (unit-tested) updated once per window of
 * COPY_WINDOW_NS from what the guest's tracker saw: while the guest is active, `share` < 1 is the
 * fraction of the time one copy may run, share >= 2 the copies in flight (no pause). AIMD on the
 * guest's mean request latency against its low-water mark: above `hurt` x it the share halves,
 * below halfway to it it grows by 1/20; never below `floor` (> 0).
 * Convergence: once per COPY_PROGRESS_NS the coordinator's dirty set is compared with what the
 * job copied meanwhile. While the guest takes back more than half of what the job copies (the
 * dirty set shrank by less than half the bytes copied), the floor doubles, up to all the workers
 * with no pause; it returns to `base_floor` once at most COPY_CONVERGED_BYTES are dirty.
 * Keeping up: once the set has been at most COPY_CONVERGED_BYTES (the job caught up, as while
 * READY), a set above COPY_KEEPUP_BYTES is copied with no pause whatever the share, so it stays
 * about that small and a complete finds only that to copy while the guest waits.
 */
#define COPY_WINDOW_NS 20000000ULL
#define COPY_PROGRESS_NS 1000000000ULL
#define COPY_CONVERGED_BYTES (4ULL << 20)
#define COPY_KEEPUP_BYTES (1ULL << 20)
typedef struct CopyBudget {
    double share;        /* [floor..64]: < 1 the time one copy may run, >= 2 copies in flight */
    double floor;        /* > 0: the copy always progresses; raised while it does not converge */
    double base_floor;   /* the configured floor (VDISK_COPY_GUEST_FLOOR) */
    unsigned raised;     /* times the floor was doubled (diagnostics, tests) */
    uint64_t ref_ns;     /* the guest's latency low-water mark (0: none yet); drifts up slowly */
    double hurt;         /* mean latency above hurt * ref: halve; below (1 + hurt) / 2 * ref: grow */
    bool guest_active;   /* the guest did I/O in the last window */
    bool caught_up;      /* the dirty set was at most COPY_CONVERGED_BYTES once (copy_budget_dirty) */
    bool behind;         /* caught up, and more than COPY_KEEPUP_BYTES dirty now: no pause */
} CopyBudget;
typedef struct CopyWindow {
    uint64_t guest_done;      /* guest requests that ended in the window */
    uint64_t guest_lat_ns;    /* their summed latency */
    unsigned guest_in_flight; /* guest requests in flight at the window's end */
} CopyWindow;
void copy_budget_init(CopyBudget *b, double floor);
void copy_budget_update(CopyBudget *b, const CopyWindow *w);
/* Copies allowed in flight: all `workers` while the guest is idle, else max(1, floor(share)). */
unsigned copy_budget_allowed(const CopyBudget *b, unsigned workers);
/* How long to wait after a copy that took copy_ns before the next starts (0: guest idle). */
uint64_t copy_budget_gap_ns(const CopyBudget *b, uint64_t copy_ns);
/*
 * One progress window: dirty0/dirty1 the dirty bytes at its start and end, copied the bytes the
 * job's copies cleaned in it; `workers` caps the raised floor (all of them in flight, no pause).
 */
void copy_budget_progress(CopyBudget *b, uint64_t dirty0, uint64_t dirty1, uint64_t copied,
                          unsigned workers);
/* The dirty set now (every turn of the coordinator's loop): keeping up (see above). */
void copy_budget_dirty(CopyBudget *b, uint64_t dirty);
/*
 * May [start, end) be submitted? Returns the end it must be clipped to (> start) so it does not
 * overlap a request in flight; 0 when start itself is inside one (then *skip_to, if not NULL, gets
 * the aligned end of that request, where the search may go on).
 */
uint64_t copy_engine_clip(CopyEngine *e, uint64_t start, uint64_t end, uint64_t *skip_to);
/* Queue a chunk for a worker. The caller checked in_flight < max and clip. Never blocks. */
void copy_engine_submit(CopyEngine *e, uint64_t off, uint64_t bytes, bool tracked);
/*
 * Take one finished request into *out. wait: block until one finishes (returns false at once if
 * nothing is in flight, or when kicked while waiting); !wait: false when none has finished.
 */
bool copy_engine_reap(CopyEngine *e, CopyChunk *out, bool wait);
/* Reap every request in flight (cb, if not NULL, sees each result). */
void copy_engine_drain(CopyEngine *e, void (*cb)(void *opaque, const CopyChunk *c), void *opaque);
/*
 * Wait for an early writeback in progress (see CopyEngineOptions): before the destination is
 * synced or closed. copy_engine_free waits for it too.
 */
void copy_engine_wait_writeback(CopyEngine *e);
/* A verb arrived (pause, cancel, set-speed...): the coordinator should drain and look. */
void copy_engine_kick(CopyEngine *e);
/* Was the engine kicked since the last call? (clears the flag) */
bool copy_engine_take_kick(CopyEngine *e);

/*
 * A linear sweep over [0, len) (block-stream, non-active block-commit), on the job thread: chunks of
 * `unit` bytes (a multiple of `align`) go to the engine, tracked; what `skip` says needs no copy is
 * only counted as progress. Job semantics, as the serial loops had them: pause points, cancel, rate
 * limit (one copy at a time of <= speed/10 while a speed is set, changeable live), progress (len
 * in total), and the error policy per failed chunk in offset order: report fails the sweep, ignore
 * skips the chunk (remembered in `ignored`), stop pauses the job and retries the chunk (and the
 * others of its batch) once resumed. One BLOCK_JOB_ERROR per reported/stopping failure.
 */
typedef struct CopySweep {
    Job *job;
    CopyEngine *engine;
    uint64_t len, unit, align;
    JobErrorAction on_error;
    /* Bytes from off (<= max) that need no copy; 0: copy the chunk at off. May be NULL. */
    uint64_t (*skip)(void *opaque, uint64_t off, uint64_t max);
    /*
     * Called on the job's thread between copies: every chunk below `done` was skipped or its
     * copy has finished (copy_engine_low_water: not merely submitted - a queued chunk may wait
     * for a worker or its pacing); the failed ones are the caller's to account for. May be NULL.
     */
    void (*tick)(void *opaque, uint64_t done);
    void *opaque;
    int ignored;           /* out: the first ignored error (0: none) */
    bool failed_is_read;   /* out: with a reported error */
} CopySweep;
/* 0 (done; see ignored), -ECANCELED, or the reported error. Drains the engine before returning. */
int copy_sweep_run(CopySweep *sw);

/*
 * The node to read a copy's source data from: `layer` (block status's deciding layer, read-only
 * below `top` while the job runs) when it is below top and covers the range, else top. Reading
 * through top would hold top's driver lock for the whole backing read and stall guest writes.
 */
BlockNode *copy_read_layer(BlockNode *top, BlockNode *layer, uint64_t offset, uint64_t bytes);

/*
 * The copy unit (1 MiB: a guest write waits for at most one such copy of its range) and the
 * number of workers per job (4); VDISK_COPY_UNIT / VDISK_COPY_WORKERS override them.
 */
uint64_t copy_engine_default_unit(void);
/*
 * The node to write back early for a destination format node `dst` (its file, when that is a local
 * file that syncs and can start a writeback: never a background flush), and how often (8 MiB;
 * VDISK_COPY_WRITEBACK, bytes, 0 = off); NULL if none.
 */
BlockNode *copy_engine_writeback_node(BlockNode *dst, uint64_t *every);
unsigned copy_engine_default_workers(void);

#endif
