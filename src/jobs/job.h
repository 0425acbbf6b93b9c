/*
 * job.h - vdiskd's background jobs: one state machine (QEMU's JobStatus/JobVerb tables), user verbs
 * (pause, resume, cancel, complete, finalize, dismiss, set-speed), a thread per job running a driver's
 * `run`, cooperative pause points, a rate limiter, progress, and the QMP events of qapi/job.json and
 * qapi/block-core.json (JOB_STATUS_CHANGE, BLOCK_JOB_READY/PENDING/COMPLETED/CANCELLED/ERROR).
 *
 * Threads and locks: one global job mutex guards every job's state and the job list. Verbs are called
 * from the QMP thread; `run` and the pause/sleep/progress helpers from the job's own thread. Once run
 * returns, prepare/commit/abort/clean run on the QMP thread (job_set_host), so they may change the graph
 * and the exports; without a QMP thread (unit tests, shutdown) the job's thread runs them. Driver
 * callbacks (run, prepare, commit, abort, clean) are called WITHOUT the job mutex. Events are queued
 * under the mutex and emitted after it is released, in order.
 */
#ifndef VDISK_JOBS_JOB_H
#define VDISK_JOBS_JOB_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "util/defer.h"
#include "util/error.h"

typedef enum JobStatus {
    JOB_STATUS_UNDEFINED,
    JOB_STATUS_CREATED,
    JOB_STATUS_RUNNING,
    JOB_STATUS_PAUSED,
    JOB_STATUS_READY,
    JOB_STATUS_STANDBY,
    JOB_STATUS_WAITING,
    JOB_STATUS_PENDING,
    JOB_STATUS_ABORTING,
    JOB_STATUS_CONCLUDED,
    JOB_STATUS_NULL,
    JOB_STATUS__MAX
} JobStatus;

typedef enum JobVerb {
    JOB_VERB_CANCEL,
    JOB_VERB_PAUSE,
    JOB_VERB_RESUME,
    JOB_VERB_SET_SPEED,
    JOB_VERB_COMPLETE,
    JOB_VERB_DISMISS,
    JOB_VERB_FINALIZE,
    JOB_VERB__MAX
} JobVerb;

/* What a job does on an I/O error (on-source-error / on-target-error). */
/* ENOSPC: stop on ENOSPC, report anything else (a policy only: never returned as an action). */
typedef enum JobErrorAction {
    JOB_ERR_REPORT,
    JOB_ERR_IGNORE,
    JOB_ERR_STOP,
    JOB_ERR_ENOSPC
} JobErrorAction;

/* QAPI MirrorSyncMode, in its order: what a copy job (mirror, backup) copies. */
typedef enum MirrorSync {
    MIRROR_SYNC_TOP,
    MIRROR_SYNC_FULL,
    MIRROR_SYNC_NONE,
    MIRROR_SYNC_INCREMENTAL,
    MIRROR_SYNC_BITMAP
} MirrorSync;

const char *job_status_name(JobStatus s);
const char *job_verb_name(JobVerb v);
/* The two tables (pure; unit-tested exhaustively). */
bool job_transition_allowed(JobStatus from, JobStatus to);
bool job_verb_allowed(JobVerb verb, JobStatus s);
/* QEMU's id rule: a letter, then letters, digits, '-', '.', '_'. */
bool job_id_wellformed(const char *id);
/* "report" (also NULL), "ignore", "stop", "enospc"; -EINVAL otherwise. */
int job_error_action_parse(const char *s, JobErrorAction *out);

typedef struct Job Job;

typedef struct JobDriver {
    const char *type; /* JobType: "mirror", "stream", "commit", ... */
    /* The job's work, on its own thread. Returns 0 or -errno (*errp set for the user). */
    int (*run)(Job *job, VdError **errp);
    /* Verb complete (QMP thread, job mutex NOT held): ask run to finish. NULL = cannot complete. */
    int (*complete)(Job *job, VdError **errp);
    /*
     * Verb cancel (job mutex held: call no job_* function): return the effective force. A ready
     * mirror takes a soft cancel as "finish without pivot" (returns false); anything else is hard.
     * NULL = always hard.
     */
    bool (*cancel)(Job *job, bool force, bool ready);
    /* Finalization, after run returned 0: prepare may fail (then abort runs instead of commit). */
    int (*prepare)(Job *job, VdError **errp);
    void (*commit)(Job *job);
    void (*abort)(Job *job);
    void (*clean)(Job *job);
    /* Called with the job mutex held whenever the job should notice a verb (wake a private wait). */
    void (*kick)(Job *job);
    /* Add driver-specific fields to a query-block-jobs entry (job mutex held). */
    void (*query)(Job *job, json_t *info);
    /* Release the driver's state (last reference). */
    void (*free)(Job *job);
} JobDriver;

typedef struct JobOptions {
    const char *id;          /* required, well-formed, unique */
    const char *device;      /* BLOCK_JOB_* "device" (QEMU: the job id); NULL = id */
    bool auto_finalize;      /* QEMU default true */
    bool auto_dismiss;       /* QEMU default true */
    int64_t speed;           /* bytes/s, 0 = unlimited, < 0 refused */
    /* The node the job works on (the disk a user names it by): query-block-jobs "vdisk-node". */
    const char *node;        /* NULL: none reported */
} JobOptions;

/* Create a job in CREATED (emits JOB_STATUS_CHANGE). opaque is the driver's state. */
Job *job_create(const JobDriver *drv, const JobOptions *opts, void *opaque, VdError **errp);
/* CREATED -> RUNNING and start the thread. On failure the job is aborted (concluded). */
int job_start(Job *job, VdError **errp);

void *job_opaque(Job *job);
const char *job_id(Job *job);
const char *job_type(Job *job);
JobStatus job_status(Job *job);
/*
 * A job re-created from its journal (user-paused before job_start) is listed PAUSED from the first
 * query: wait (at most 10 s) until its thread sits in its first pause point.
 */
void job_wait_paused(Job *job);

/* Lookup by id; returns a new reference (job_unref it) since the job may conclude meanwhile. */
Job *job_find(const char *id);
/* Iterate in creation order (job mutex NOT held during cb; cb must not dismiss). */
void job_foreach(void (*cb)(Job *job, void *opaque), void *opaque);

/* ---- verbs (QMP thread); errors carry QEMU's messages ---- */
int job_user_pause(Job *job, VdError **errp);
int job_user_resume(Job *job, VdError **errp);
int job_user_cancel(Job *job, bool force, VdError **errp);
int job_user_complete(Job *job, VdError **errp);
int job_user_finalize(Job *job, VdError **errp);
int job_user_dismiss(Job *job, VdError **errp);
int job_set_speed(Job *job, int64_t speed, VdError **errp);

/* query-jobs entry / query-block-jobs entry (new references). */
json_t *job_query_info(Job *job);
json_t *job_query_block_info(Job *job);

/* ---- for drivers, on the job thread ---- */

/* Block here while paused; returns promptly once cancelled. */
void job_pause_point(Job *job);
/* Sleep up to ns (interrupted by any verb), then pass a pause point. */
void job_sleep_ns(Job *job, uint64_t ns);
/* Account bytes just copied to the rate limiter and sleep as long as the speed demands. */
void job_rate_limit(Job *job, uint64_t bytes);
/* Current speed (bytes/s, 0 = unlimited): drivers size their chunks by it. */
uint64_t job_get_speed(Job *job);
/* query-block-jobs "busy": drivers waiting on their own condition mark themselves idle. */
void job_set_busy(Job *job, bool busy);
/* Hard cancel requested (the job must stop and fail with -ECANCELED). */
bool job_is_cancelled(Job *job);
/* Any cancel requested, soft (ready mirror: finish without pivot) or hard. */
bool job_cancel_requested(Job *job);
bool job_is_ready(Job *job);
/* RUNNING -> READY (offset := len), emits BLOCK_JOB_READY; a no-op once hard-cancelled. */
void job_transition_to_ready(Job *job);
/* Progress: offset/len of query-block-jobs. */
void job_progress_update(Job *job, uint64_t done);
void job_progress_set_remaining(Job *job, uint64_t remaining);
void job_progress_get(Job *job, uint64_t *current, uint64_t *total);
/*
 * Report an I/O error per the action: emits BLOCK_JOB_ERROR {device, operation, action}. Returns
 * the action to take: REPORT (fail the job), IGNORE (carry on), STOP (the job is now paused by the
 * user's account: call job_pause_point, then retry). is_read picks "read"/"write".
 */
JobErrorAction job_handle_io_error(Job *job, JobErrorAction policy, bool is_read, int err);

/* ---- references and the event sink ---- */
void job_ref(Job *job);
void job_unref(Job *job);
/* Where events go; steals data. */
typedef void JobEventSink(const char *name, json_t *data);
/*
 * The jobs' host (vdiskd's QMP server, when it starts) installs where events go and where a job's
 * completion runs (defer: the thread that may change the graph; -ESRCH: none, the job's thread
 * runs it). Until then events are dropped and completions run on the job's thread.
 */
void job_set_host(JobEventSink *emit, VdDeferFn *defer);
/* Tests capture events here instead of the host's sink; NULL goes back to the host's. */
void job_set_event_sink(JobEventSink *fn);
/*
 * Wait until the job's thread has finished and its completion (finalization, which runs on the QMP
 * thread when one runs) is done (tests, shutdown). Never call it on the QMP thread.
 */
void job_wait_thread(Job *job);
/* Cancel every job (force) and wait for their threads (daemon shutdown, before nbd_server_stop). */
void job_cancel_all_sync(void);

/*
 * Rate limiter (exposed for tests): 100 ms slices; returns the ns to wait before the next request
 * after `bytes` were dispatched at now_ns under `speed` bytes/s (0 = unlimited -> 0).
 */
typedef struct JobRateLimit {
    uint64_t slice_start_ns;
    uint64_t dispatched;
} JobRateLimit;
uint64_t job_ratelimit_account(JobRateLimit *rl, uint64_t speed, uint64_t now_ns, uint64_t bytes);
/* CLOCK_MONOTONIC in nanoseconds: the clock of rate limits and measured pauses. */
uint64_t job_now_ns(void);

/*
 * The live progress a copy job with a dirty bitmap (mirror, active commit) adds to
 * query-block-jobs: copy and dirty rates in bytes/s over the time since the previous sample
 * (samples at least 1 s apart; 0 until two were taken). The caller serialises (its own lock).
 */
typedef struct JobRates {
    uint64_t t, copied, dirtied; /* the previous sample */
    uint64_t copy_rate, dirty_rate;
} JobRates;
/* Take a sample of the job's running totals if the previous one is at least 1 s old. */
void job_rates_sample(JobRates *r, uint64_t now_ns, uint64_t copied, uint64_t dirtied);
/*
 * Set QEMU 8.2's actively-synced and vdisk's vdisk-phase, vdisk-dirty-bytes, vdisk-copy-rate,
 * vdisk-dirty-rate, vdisk-copied-bytes and vdisk-eta-ready (seconds to READY at these rates: 0 once
 * ready, absent while guests dirty as fast as the job copies) in info.
 */
void job_rates_report(json_t *info, const JobRates *r, const char *phase, bool synced,
                      uint64_t dirty, uint64_t copied);

#endif
