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
     * fdatasyncs `writeback` (the destination's protocol node: no format lock, copies go on), so
     * the disk writes while the job copies and the job's final flush (which alone makes the copy
     * durable) finds little left. NULL / 0 = off.
     */
    BlockNode *writeback;
    uint64_t writeback_every;
} CopyEngineOptions;

CopyEngine *copy_engine_new(const CopyEngineOptions *o);
/* Waits for the requests in flight, stops and joins the workers. NULL is a no-op. */
void copy_engine_free(CopyEngine *e);

/* Requests submitted and not reaped yet. */
unsigned copy_engine_in_flight(CopyEngine *e);
unsigned copy_engine_max_in_flight(CopyEngine *e);
/*
 * Guest priority: how many copies may be in flight now. All workers while no guest request is in
 * flight on the engine's tracker; fewer (1 by default, VDISK_COPY_BUSY_WORKERS) while one is, so
 * an active guest competes with one copy for the CPU and waits for at most one unit.
 */
unsigned copy_engine_allowed(CopyEngine *e);
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
/* Wait for an early writeback in progress (before run returns: see CopyEngineOptions). */
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
 * file that syncs), and how often (256 MiB; VDISK_COPY_WRITEBACK, bytes, 0 = off); NULL if none.
 */
BlockNode *copy_engine_writeback_node(BlockNode *dst, uint64_t *every);
unsigned copy_engine_default_workers(void);

#endif
