/*
 * mirror-internal.h - inside a live copy, not a contract outside jobs/mirror*.c: the job's state
 * (struct Mirror) and what mirror.c (the job: filter, write hook, the copy loop, pivot) and
 * mirror-copy.c (the copying itself) call in each other. Locking: as mirror.c says.
 */
#ifndef VDISK_JOBS_MIRROR_INTERNAL_H
#define VDISK_JOBS_MIRROR_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "block/tracking.h"
#include "jobs/copy.h"
#include "jobs/job.h"
#include "jobs/journal.h"

typedef struct Mirror Mirror;

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

typedef struct MirrorReap {
    Mirror *m;
    bool failed;           /* the first failure since the last quiet point */
    CopyChunk first_failure;
    uint64_t window_copied;
    uint64_t to_account;   /* bytes for the rate limiter (only while a speed is set) */
} MirrorReap;

/* ---- mirror.c: the dirty bitmap (m->lock held) ---- */

/* Returns how many chunks changed state. */
uint64_t mirror_bm_set(Mirror *m, uint64_t offset, uint64_t bytes, bool dirty);

/* Is bit i (granule i) dirty? */
bool mirror_bm_get(Mirror *m, uint64_t i);

/*
 * First dirty bit at or after `from` (wrapping once); false if none. The two halves are searched
 * separately: stepping word by word across the wrap of a bitmap whose length is not a multiple of
 * 64 skipped the bits at the start of word 0, and the copy loop then spun forever on them.
 */
bool mirror_bm_next(Mirror *m, uint64_t from, uint64_t *out);

/* Dirty bytes (at most the disk's length). */
uint64_t mirror_dirty_bytes_locked(Mirror *m);

/* ---- mirror-copy.c ---- */

/*
 * Make every copy written to the target so far durable: the target's own layers (format + file),
 * never its backing (the source during the copy, base after). A no-op when nothing was copied
 * since the last successful flush.
 */
int mirror_flush_target(Mirror *m);

/* mirror_flush_target, also covering write-blocking guest writes (the journal's clears). */
int mirror_flush_target_all(Mirror *m);

/*
 * What the target reads at [off, off+n) once it has its final backing (its own layer where it
 * decides, else the final backing, else zeroes): during the copy its in-memory backing is the
 * source, which would hide a range the copy missed.
 */
int mirror_target_final_pread(Mirror *m, uint64_t off, uint64_t n, uint8_t *buf);

/* Initial dirty bitmap: what the source decides above base, plus/minus target allocations. */
int mirror_scan(Mirror *m);

/* Progress for query-block-jobs (ready: the copy is in sync). */
void mirror_update_progress(Mirror *m, bool ready);

/* An I/O error of the copy: returns 0 to carry on (retry later) or the error to fail with. */
int mirror_io_error(Mirror *m, int r, bool is_read, VdError **errp);

/* One chunk, on a copy worker. Tracked (run): the range is held; clear its bits only now. */
void mirror_copy_chunk(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size);

/*
 * The next dirty range at or after *cursor (wrapping) that overlaps no copy in flight, at most
 * max_bytes, starting on an `a` boundary (the engine's alignment, or the granularity when only
 * one copy may be in flight). False when there is none right now.
 */
bool mirror_pick(Mirror *m, uint64_t *cursor, uint64_t max_bytes, uint64_t a, uint64_t *off,
                 uint64_t *n);

/* A chunk the engine finished (job thread): its accounting, a failure kept for the job. */
void mirror_reaped(void *opaque, const CopyChunk *c);

/*
 * x-verify: before the pivot (or the end of a soft cancel), compare every byte the guest reads
 * from the source with what the target will read on its own. Each unit holds the job's range
 * (BT_SHARED: guest writes to it wait) and first copies what is dirty in it, so the comparison is
 * exact; writes after a unit was checked are copied by the tail. Reads the whole disk twice.
 */
int mirror_verify(Mirror *m, VdError **errp);

#endif
