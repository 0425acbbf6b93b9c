/*
 * job.c - the job state machine, verbs, job threads, pause points, rate limiting and job events.
 * Invariants: every status change goes through job_transition (checked against the table and
 * announced by JOB_STATUS_CHANGE); job_mutex guards all job fields and the list; events are queued
 * under job_mutex and emitted after it is dropped, by one flusher at a time, in queue order - so the
 * QMP server is never called with job_mutex held and clients see events in the order they happened.
 * Where things run: `run` on the job's thread; everything after it (prepare/commit/abort/clean, the
 * final events, auto-dismiss) on the QMP thread, handed over with the host's defer function
 * (job_set_host; vdiskd's QMP server installs qmp_defer), because those steps
 * change the graph and the exports, which only the QMP thread may do (docs/concurrency.md). Without
 * a QMP thread (unit tests, daemon shutdown after qmp_server_stop) the job's thread does it, and
 * then no other thread changes the graph.
 */
#include "jobs/job.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/lock.h"
#include "util/log.h"
#include "util/thread-cache.h"

/* ---- the tables (qapi/job.json semantics; same shape as QEMU 7.2's job.c tables) ---- */

/* Columns/rows in JobStatus order: U C R P Y S W D X E N */
static const bool job_stt[JOB_STATUS__MAX][JOB_STATUS__MAX] = {
    [JOB_STATUS_UNDEFINED] = {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    [JOB_STATUS_CREATED]   = {0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1},
    [JOB_STATUS_RUNNING]   = {0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0},
    [JOB_STATUS_PAUSED]    = {0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0},
    [JOB_STATUS_READY]     = {0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0},
    [JOB_STATUS_STANDBY]   = {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    [JOB_STATUS_WAITING]   = {0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0},
    [JOB_STATUS_PENDING]   = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    [JOB_STATUS_ABORTING]  = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    [JOB_STATUS_CONCLUDED] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
    [JOB_STATUS_NULL]      = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
};

static const bool job_verb_table[JOB_VERB__MAX][JOB_STATUS__MAX] = {
    [JOB_VERB_CANCEL]    = {0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0},
    [JOB_VERB_PAUSE]     = {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    [JOB_VERB_RESUME]    = {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    [JOB_VERB_SET_SPEED] = {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    [JOB_VERB_COMPLETE]  = {0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0},
    [JOB_VERB_DISMISS]   = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
    [JOB_VERB_FINALIZE]  = {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
};

static const char *const status_names[JOB_STATUS__MAX] = {
    "undefined", "created", "running", "paused", "ready", "standby",
    "waiting", "pending", "aborting", "concluded", "null",
};

static const char *const verb_names[JOB_VERB__MAX] = {
    "cancel", "pause", "resume", "set-speed", "complete", "dismiss", "finalize",
};

const char *job_status_name(JobStatus s)
{
    return (unsigned)s < JOB_STATUS__MAX ? status_names[s] : "undefined";
}

const char *job_verb_name(JobVerb v)
{
    return (unsigned)v < JOB_VERB__MAX ? verb_names[v] : "?";
}

bool job_transition_allowed(JobStatus from, JobStatus to)
{
    if ((unsigned)from >= JOB_STATUS__MAX || (unsigned)to >= JOB_STATUS__MAX) {
        return false;
    }
    return job_stt[from][to];
}

bool job_verb_allowed(JobVerb verb, JobStatus s)
{
    if ((unsigned)verb >= JOB_VERB__MAX || (unsigned)s >= JOB_STATUS__MAX) {
        return false;
    }
    return job_verb_table[verb][s];
}

bool job_id_wellformed(const char *id)
{
    if (!id || !((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z'))) {
        return false;
    }
    for (const char *p = id + 1; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == '_')) {
            return false;
        }
    }
    return true;
}

int job_error_action_parse(const char *s, JobErrorAction *out)
{
    if (!s || !strcmp(s, "report")) {
        *out = JOB_ERR_REPORT;
    } else if (!strcmp(s, "enospc")) {
        *out = JOB_ERR_ENOSPC;
    } else if (!strcmp(s, "ignore")) {
        *out = JOB_ERR_IGNORE;
    } else if (!strcmp(s, "stop")) {
        *out = JOB_ERR_STOP;
    } else {
        return -EINVAL;
    }
    return 0;
}

/* ---- rate limiting ---- */

#define SLICE_NS 100000000ULL /* 100 ms: a burst of one slice is free, like QEMU's ratelimit */

uint64_t job_ratelimit_account(JobRateLimit *rl, uint64_t speed, uint64_t now_ns, uint64_t bytes)
{
    if (speed == 0) {
        rl->slice_start_ns = now_ns;
        rl->dispatched = 0;
        return 0;
    }
    /* slice_start_ns is the virtual time at which everything dispatched so far is paid for. */
    uint64_t floor_ns = now_ns > SLICE_NS ? now_ns - SLICE_NS : 0;
    if (rl->slice_start_ns < floor_ns) {
        rl->slice_start_ns = floor_ns;
    }
    rl->slice_start_ns += (uint64_t)((unsigned __int128)bytes * 1000000000ULL / speed);
    rl->dispatched += bytes;
    return rl->slice_start_ns > now_ns ? rl->slice_start_ns - now_ns : 0;
}

uint64_t job_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void job_rates_sample(JobRates *r, uint64_t now_ns, uint64_t copied, uint64_t dirtied)
{
    if (r->t && now_ns - r->t < 1000000000ULL) {
        return;
    }
    if (r->t) {
        double secs = (double)(now_ns - r->t) / 1e9;
        r->copy_rate = (uint64_t)((double)(copied - r->copied) / secs);
        r->dirty_rate = (uint64_t)((double)(dirtied - r->dirtied) / secs);
    }
    r->t = now_ns;
    r->copied = copied;
    r->dirtied = dirtied;
}

void job_rates_report(json_t *info, const JobRates *r, const char *phase, bool synced,
                      uint64_t dirty, uint64_t copied)
{
    bool ready = json_is_true(json_object_get(info, "ready"));
    json_object_set_new(info, "actively-synced", json_boolean(synced));
    json_object_set_new(info, "vdisk-phase", json_string(phase));
    json_object_set_new(info, "vdisk-dirty-bytes", json_integer((json_int_t)dirty));
    json_object_set_new(info, "vdisk-copy-rate", json_integer((json_int_t)r->copy_rate));
    json_object_set_new(info, "vdisk-dirty-rate", json_integer((json_int_t)r->dirty_rate));
    json_object_set_new(info, "vdisk-copied-bytes", json_integer((json_int_t)copied));
    if (ready) {
        json_object_set_new(info, "vdisk-eta-ready", json_integer(0));
    } else if (r->copy_rate > r->dirty_rate) {
        uint64_t net = r->copy_rate - r->dirty_rate;
        json_object_set_new(info, "vdisk-eta-ready",
                            json_integer((json_int_t)((dirty + net - 1) / net)));
    }
}

/* ---- jobs ---- */

typedef enum { IOSTATUS_OK, IOSTATUS_FAILED, IOSTATUS_NOSPACE } IoStatus;

struct Job {
    char *id;
    char *device;
    char *node;              /* JobOptions.node (NULL: none) */
    const JobDriver *drv;
    void *opaque;
    int refcnt;
    Job *next;

    JobStatus status;
    bool auto_finalize, auto_dismiss;
    int pause_count;      /* > 0: the job must sit in a pause point */
    bool user_paused;     /* one of the pause_count is the user's (or an error "stop") */
    bool parked;          /* the job thread sits in job_pause_point, PAUSED or STANDBY */
    bool busy;            /* false while sleeping or paused (query-block-jobs "busy") */
    bool cancelled;       /* any cancel requested */
    bool force_cancel;    /* hard cancel: run must fail with -ECANCELED */
    bool kicked;          /* a verb arrived: interrupt sleeps */
    bool thread_running;  /* run, or the completion after it (job_run_done), not finished yet */
    bool finalizing;      /* prepare/commit or abort in progress (not twice) */
    IoStatus iostatus;

    uint64_t speed;
    JobRateLimit rl;
    uint64_t progress_current, progress_total;
    int ret;
    char *error;

    pthread_t thread;
    pthread_cond_t cond;

    /* run's result, handed to the QMP thread (job_run_done). */
    VdDeferred done_bh;
    int run_ret;
    VdError *run_err;
};

static pthread_mutex_t job_mutex = PTHREAD_MUTEX_INITIALIZER;
static Job *jobs_head;

/* ---- events ---- */

typedef struct QueuedEvent {
    char *name;
    json_t *data;
    struct QueuedEvent *next;
} QueuedEvent;

static QueuedEvent *ev_head, *ev_tail; /* job_mutex */
static pthread_mutex_t emit_mutex = PTHREAD_MUTEX_INITIALIZER;
/* The host's (job_set_host): none until a QMP server starts, then events are dropped. */
static JobEventSink *host_emit;
static VdDeferFn *host_defer;
static JobEventSink *event_sink; /* a test's capture (job_set_event_sink), else host_emit */

void job_set_host(JobEventSink *emit, VdDeferFn *defer)
{
    host_emit = emit;
    host_defer = defer;
}

void job_set_event_sink(JobEventSink *fn)
{
    event_sink = fn;
}

static void emit_event(const char *name, json_t *data)
{
    JobEventSink *sink = event_sink ? event_sink : host_emit;
    if (sink) {
        sink(name, data);
    } else {
        json_decref(data);
    }
}

/* job_mutex held. On ENOMEM the event is lost (logged): never fail a state change for it. */
static void queue_event(const char *name, json_t *data)
{
    QueuedEvent *e = calloc(1, sizeof(*e));
    if (!e || !(e->name = strdup(name))) {
        free(e);
        json_decref(data);
        vd_log(VD_LOG_ERROR, "job: out of memory, event %s dropped", name);
        return;
    }
    e->data = data;
    if (ev_tail) {
        ev_tail->next = e;
    } else {
        ev_head = e;
    }
    ev_tail = e;
}

/*
 * Emit queued events (job_mutex NOT held). Only one thread emits at a time; a thread that finds
 * another emitting leaves its events to it, and the emitter re-checks the queue after letting go,
 * so nothing is stranded and nobody waits on a thread that may itself be blocked in the QMP server.
 */
static void flush_events(void)
{
    for (;;) {
        if (pthread_mutex_trylock(&emit_mutex) != 0) {
            return;
        }
        for (;;) {
            vd_mutex_lock(&job_mutex);
            QueuedEvent *e = ev_head;
            if (e) {
                ev_head = e->next;
                if (!ev_head) {
                    ev_tail = NULL;
                }
            }
            vd_mutex_unlock(&job_mutex);
            if (!e) {
                break;
            }
            emit_event(e->name, e->data);
            free(e->name);
            free(e);
        }
        vd_mutex_unlock(&emit_mutex);
        vd_mutex_lock(&job_mutex);
        bool more = ev_head != NULL;
        vd_mutex_unlock(&job_mutex);
        if (!more) {
            return;
        }
    }
}

static void unlock_and_flush(void)
{
    vd_mutex_unlock(&job_mutex);
    flush_events();
}

/* BLOCK_JOB_{READY,COMPLETED,CANCELLED} common fields (job_mutex held). */
static json_t *block_event_data(Job *job)
{
    return json_pack("{s:s, s:I, s:I, s:I, s:s}", "device", job->device,
                     "len", (json_int_t)job->progress_total,
                     "offset", (json_int_t)job->progress_current,
                     "speed", (json_int_t)job->speed, "type", job->drv->type);
}

/* job_mutex held. */
static void job_transition(Job *job, JobStatus to)
{
    JobStatus from = job->status;
    if (!job_transition_allowed(from, to)) {
        /* A bug in this file or a driver: keep going, but make it loud. */
        vd_log(VD_LOG_ERROR, "job '%s': illegal transition %s -> %s", job->id,
               job_status_name(from), job_status_name(to));
        assert(!"illegal job transition");
    }
    job->status = to;
    queue_event("JOB_STATUS_CHANGE", json_pack("{s:s, s:s}", "id", job->id,
                                               "status", job_status_name(to)));
}

static int verb_check(Job *job, JobVerb verb, VdError **errp)
{
    if (job_verb_allowed(verb, job->status)) {
        return 0;
    }
    vd_error_setg(errp, EPERM, "Job '%s' in state '%s' cannot accept command verb '%s'", job->id,
                  job_status_name(job->status), job_verb_name(verb));
    return -EPERM;
}

/* job_mutex held: wake the job out of sleeps / pause waits. */
static void job_kick(Job *job)
{
    job->kicked = true;
    vd_cond_broadcast(&job->cond);
    if (job->drv->kick) {
        job->drv->kick(job);
    }
}

void job_ref(Job *job)
{
    __atomic_add_fetch(&job->refcnt, 1, __ATOMIC_RELAXED);
}

static void job_free(Job *job)
{
    if (job->drv->free) {
        job->drv->free(job);
    }
    pthread_cond_destroy(&job->cond);
    free(job->id);
    free(job->device);
    free(job->node);
    free(job->error);
    free(job);
}

void job_unref(Job *job)
{
    if (job && __atomic_sub_fetch(&job->refcnt, 1, __ATOMIC_ACQ_REL) == 0) {
        job_free(job);
    }
}

Job *job_create(const JobDriver *drv, const JobOptions *opts, void *opaque, VdError **errp)
{
    if (!job_id_wellformed(opts->id)) {
        vd_error_setg(errp, EINVAL, "Invalid job ID '%s'", opts->id ? opts->id : "");
        return NULL;
    }
    if (opts->speed < 0) {
        vd_error_setg(errp, EINVAL, "Invalid parameter 'speed'");
        return NULL;
    }
    vd_mutex_lock(&job_mutex);
    for (Job *j = jobs_head; j; j = j->next) {
        if (!strcmp(j->id, opts->id)) {
            vd_mutex_unlock(&job_mutex);
            vd_error_setg(errp, EEXIST, "Job ID '%s' already in use", opts->id);
            return NULL;
        }
    }
    Job *job = calloc(1, sizeof(*job));
    if (!job || !(job->id = strdup(opts->id)) ||
        !(job->device = strdup(opts->device ? opts->device : opts->id)) ||
        (opts->node && !(job->node = strdup(opts->node)))) {
        vd_mutex_unlock(&job_mutex);
        if (job) {
            free(job->id);
            free(job->device);
            free(job);
        }
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    job->drv = drv;
    job->opaque = opaque;
    job->refcnt = 1; /* the list's */
    job->auto_finalize = opts->auto_finalize;
    job->auto_dismiss = opts->auto_dismiss;
    job->speed = (uint64_t)opts->speed;
    job->busy = true;
    /* Timed waits (job_sleep_ns) use CLOCK_MONOTONIC deadlines. */
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&job->cond, &ca);
    pthread_condattr_destroy(&ca);
    Job **pp = &jobs_head;
    while (*pp) {
        pp = &(*pp)->next;
    }
    *pp = job;
    job_transition(job, JOB_STATUS_CREATED);
    unlock_and_flush();
    return job;
}

void *job_opaque(Job *job)
{
    return job->opaque;
}

const char *job_id(Job *job)
{
    return job->id;
}

const char *job_type(Job *job)
{
    return job->drv->type;
}

void job_wait_paused(Job *job)
{
    for (int i = 0; i < 10000 && job_status(job) != JOB_STATUS_PAUSED; i++) {
        nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
    }
}

JobStatus job_status(Job *job)
{
    vd_mutex_lock(&job_mutex);
    JobStatus s = job->status;
    vd_mutex_unlock(&job_mutex);
    return s;
}

Job *job_find(const char *id)
{
    if (!id) {
        return NULL;
    }
    vd_mutex_lock(&job_mutex);
    Job *j = jobs_head;
    while (j && strcmp(j->id, id) != 0) {
        j = j->next;
    }
    if (j) {
        job_ref(j);
    }
    vd_mutex_unlock(&job_mutex);
    return j;
}

void job_foreach(void (*cb)(Job *job, void *opaque), void *opaque)
{
    /* Snapshot with references so cb runs without the mutex. */
    vd_mutex_lock(&job_mutex);
    size_t n = 0;
    for (Job *j = jobs_head; j; j = j->next) {
        n++;
    }
    Job **arr = n ? calloc(n, sizeof(*arr)) : NULL;
    size_t i = 0;
    for (Job *j = jobs_head; arr && j; j = j->next) {
        job_ref(j);
        arr[i++] = j;
    }
    vd_mutex_unlock(&job_mutex);
    for (size_t k = 0; k < i; k++) {
        cb(arr[k], opaque);
        job_unref(arr[k]);
    }
    free(arr);
}

/* job_mutex held: CONCLUDED -> NULL and off the list (drops the list's reference later). */
static Job *job_do_dismiss_locked(Job *job)
{
    job_transition(job, JOB_STATUS_NULL);
    for (Job **pp = &jobs_head; *pp; pp = &(*pp)->next) {
        if (*pp == job) {
            *pp = job->next;
            break;
        }
    }
    return job; /* caller unrefs after unlocking */
}

static void set_error_locked(Job *job, int ret, VdError *err)
{
    if (!job->error) {
        const char *msg = err ? vd_error_msg(err) : NULL;
        job->error = strdup(msg && *msg ? msg : strerror(-ret));
    }
}

/* From ABORTING on: abort + clean, the final event, CONCLUDED (and NULL with auto-dismiss). */
static void job_finish_abort(Job *job)
{
    vd_mutex_lock(&job_mutex);
    job_transition(job, JOB_STATUS_ABORTING);
    unlock_and_flush();
    if (job->drv->abort) {
        job->drv->abort(job);
    }
    if (job->drv->clean) {
        job->drv->clean(job);
    }
    vd_mutex_lock(&job_mutex);
    if (job->cancelled && job->ret == -ECANCELED) {
        queue_event("BLOCK_JOB_CANCELLED", block_event_data(job));
    } else {
        json_t *d = block_event_data(job);
        if (d) {
            json_object_set_new(d, "error", json_string(job->error ? job->error : "error"));
        }
        queue_event("BLOCK_JOB_COMPLETED", d);
    }
    job_transition(job, JOB_STATUS_CONCLUDED);
    Job *drop = job->auto_dismiss ? job_do_dismiss_locked(job) : NULL;
    unlock_and_flush();
    job_unref(drop);
}

/* PENDING -> prepare -> commit/abort -> CONCLUDED. Any thread, job_mutex NOT held. */
static void job_do_finalize(Job *job)
{
    VdError *err = NULL;
    int r = job->drv->prepare ? job->drv->prepare(job, &err) : 0;
    if (r < 0) {
        vd_mutex_lock(&job_mutex);
        job->ret = r;
        set_error_locked(job, r, err);
        vd_mutex_unlock(&job_mutex);
        vd_error_free(err);
        job_finish_abort(job);
        return;
    }
    if (job->drv->commit) {
        job->drv->commit(job);
    }
    if (job->drv->clean) {
        job->drv->clean(job);
    }
    vd_mutex_lock(&job_mutex);
    queue_event("BLOCK_JOB_COMPLETED", block_event_data(job));
    job_transition(job, JOB_STATUS_CONCLUDED);
    Job *drop = job->auto_dismiss ? job_do_dismiss_locked(job) : NULL;
    unlock_and_flush();
    job_unref(drop);
}

/* After run returned (job thread). */
static void job_completed(Job *job, int ret, VdError *err)
{
    vd_mutex_lock(&job_mutex);
    job->busy = false;
    if (ret == 0 && job->cancelled && job->force_cancel) {
        ret = -ECANCELED;
    }
    job->ret = ret;
    if (ret < 0) {
        set_error_locked(job, ret, err);
        job->finalizing = true;
        vd_mutex_unlock(&job_mutex);
        job_finish_abort(job);
        return;
    }
    job_transition(job, JOB_STATUS_WAITING);
    job_transition(job, JOB_STATUS_PENDING);
    if (!job->auto_finalize) {
        queue_event("BLOCK_JOB_PENDING", json_pack("{s:s, s:s}", "type", job->drv->type,
                                                   "id", job->id));
        unlock_and_flush();
        return;
    }
    job->finalizing = true;
    unlock_and_flush();
    job_do_finalize(job);
}

/*
 * Serialises job completions that do not run on the QMP thread: at shutdown, after qmp_server_stop,
 * several job threads may finish at once (and main runs the callbacks queued before the stop, or
 * aborts parked jobs) - one graph writer at a time still. Taken before job_mutex, never while
 * waiting for a job thread.
 */
static pthread_mutex_t completion_lock = PTHREAD_MUTEX_INITIALIZER;

/* After run returned: completion (graph changes) on the QMP thread, or here without one. */
static void job_run_done(void *opaque)
{
    Job *job = opaque;
    vd_mutex_lock(&completion_lock);
    job_completed(job, job->run_ret, job->run_err);
    vd_mutex_unlock(&completion_lock);
    vd_error_free(job->run_err);
    job->run_err = NULL;
    /*
     * Drop the thread's reference before announcing the end, so that a job_wait_thread caller
     * holding its own reference is the one whose unref frees the job.
     */
    vd_mutex_lock(&job_mutex);
    bool last = __atomic_sub_fetch(&job->refcnt, 1, __ATOMIC_ACQ_REL) == 0;
    job->thread_running = false;
    vd_cond_broadcast(&job->cond);
    vd_mutex_unlock(&job_mutex);
    if (last) {
        job_free(job);
    }
}

static void *job_thread(void *arg)
{
    Job *job = arg;
    vd_thread_name("job %s", job->id);
    job->run_err = NULL;
    job->run_ret = job->drv->run(job, &job->run_err);
    job->done_bh.fn = job_run_done;
    job->done_bh.opaque = job;
    if (!host_defer || host_defer(&job->done_bh) < 0) {
        job_run_done(job);
    }
    return NULL;
}

int job_start(Job *job, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    job_transition(job, JOB_STATUS_RUNNING);
    job->thread_running = true;
    job_ref(job);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int r = pthread_create(&job->thread, &attr, job_thread, job);
    pthread_attr_destroy(&attr);
    if (r != 0) {
        job->thread_running = false;
        job->ret = -r;
        set_error_locked(job, -r, NULL);
        vd_mutex_unlock(&job_mutex);
        job_unref(job);
        vd_error_setg_errno(errp, r, "Cannot start job '%s'", job->id);
        job_finish_abort(job);
        return -r;
    }
    unlock_and_flush();
    return 0;
}

void job_wait_thread(Job *job)
{
    vd_mutex_lock(&job_mutex);
    while (job->thread_running) {
        vd_cond_wait(&job->cond, &job_mutex);
    }
    vd_mutex_unlock(&job_mutex);
}

void job_cancel_all_sync(void)
{
    for (;;) {
        vd_mutex_lock(&job_mutex);
        Job *victim = NULL;
        bool parked = false;
        for (Job *j = jobs_head; j; j = j->next) {
            if (j->thread_running) {
                victim = j;
                break;
            }
            if (j->status == JOB_STATUS_PENDING && !j->finalizing) {
                victim = j; /* waiting for job-finalize: abort it */
                parked = true;
                break;
            }
        }
        if (victim) {
            job_ref(victim);
            if (!parked) {
                victim->cancelled = victim->force_cancel = true;
                if (victim->user_paused) {
                    victim->user_paused = false;
                    victim->pause_count--;
                }
                job_kick(victim);
            }
        }
        vd_mutex_unlock(&job_mutex);
        if (!victim) {
            break;
        }
        if (parked) {
            vd_mutex_lock(&completion_lock);
            job_user_cancel(victim, true, NULL);
            vd_mutex_unlock(&completion_lock);
        } else {
            job_wait_thread(victim);
        }
        job_unref(victim);
    }
    /* Dismiss what is left (concluded jobs nobody dismissed) so their state is freed. */
    for (;;) {
        vd_mutex_lock(&job_mutex);
        Job *j = jobs_head;
        while (j && j->status != JOB_STATUS_CONCLUDED) {
            j = j->next;
        }
        Job *drop = j ? job_do_dismiss_locked(j) : NULL;
        unlock_and_flush();
        if (!drop) {
            return;
        }
        job_unref(drop);
    }
}

/* ---- verbs ---- */

int job_user_pause(Job *job, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    int r = verb_check(job, JOB_VERB_PAUSE, errp);
    if (r == 0 && job->user_paused) {
        vd_error_setg(errp, EBUSY, "Job is already paused");
        r = -EBUSY;
    }
    if (r == 0) {
        job->user_paused = true;
        job->pause_count++;
        /* Resumed but not yet back from its pause point: it is paused again as it stands. */
        if (job->parked && job->status == JOB_STATUS_RUNNING) {
            job_transition(job, JOB_STATUS_PAUSED);
        } else if (job->parked && job->status == JOB_STATUS_READY) {
            job_transition(job, JOB_STATUS_STANDBY);
        }
        job_kick(job);
    }
    unlock_and_flush();
    return r;
}

int job_user_resume(Job *job, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    int r = verb_check(job, JOB_VERB_RESUME, errp);
    if (r == 0 && !job->user_paused) {
        vd_error_setg(errp, EINVAL, "Can't resume a job that was not paused");
        r = -EINVAL;
    }
    if (r == 0) {
        job->user_paused = false;
        job->pause_count--;
        job->iostatus = IOSTATUS_OK; /* a resume retries what failed */
        /* As QEMU, whose resume re-enters the job at once: leave PAUSED / STANDBY before the
         * verb returns, not when the job thread next runs (it finds its status already back). */
        if (job->pause_count == 0 && job->parked && job->status == JOB_STATUS_PAUSED) {
            job_transition(job, JOB_STATUS_RUNNING);
        } else if (job->pause_count == 0 && job->parked && job->status == JOB_STATUS_STANDBY) {
            job_transition(job, JOB_STATUS_READY);
        }
        job_kick(job);
    }
    unlock_and_flush();
    return r;
}

int job_user_cancel(Job *job, bool force, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    int r = verb_check(job, JOB_VERB_CANCEL, errp);
    if (r < 0) {
        vd_mutex_unlock(&job_mutex);
        return r;
    }
    if (job->status == JOB_STATUS_PENDING && !job->finalizing) {
        /* Parked waiting for job-finalize: abort it here. */
        job->cancelled = job->force_cancel = true;
        job->ret = -ECANCELED;
        set_error_locked(job, -ECANCELED, NULL);
        job->finalizing = true;
        vd_mutex_unlock(&job_mutex);
        job_finish_abort(job);
        return 0;
    }
    bool ready = job->status == JOB_STATUS_READY || job->status == JOB_STATUS_STANDBY;
    bool eff = job->drv->cancel ? job->drv->cancel(job, force, ready) : true;
    job->cancelled = true;
    job->force_cancel |= eff;
    /* Cancelling a paused job resumes it (qapi/job.json). */
    if (job->user_paused) {
        job->user_paused = false;
        job->pause_count--;
    }
    job_kick(job);
    unlock_and_flush();
    return 0;
}

int job_user_complete(Job *job, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    int r = verb_check(job, JOB_VERB_COMPLETE, errp);
    if (r == 0 && (job->pause_count > 0 || job->cancelled || !job->drv->complete)) {
        vd_error_setg(errp, EBUSY, "The active block job '%s' cannot be completed", job->id);
        r = -EBUSY;
    }
    vd_mutex_unlock(&job_mutex);
    if (r < 0) {
        return r;
    }
    r = job->drv->complete(job, errp);
    vd_mutex_lock(&job_mutex);
    job_kick(job);
    unlock_and_flush();
    return r;
}

int job_user_finalize(Job *job, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    int r = verb_check(job, JOB_VERB_FINALIZE, errp);
    if (r == 0 && job->finalizing) {
        vd_error_setg(errp, EBUSY, "Job '%s' is already being finalized", job->id);
        r = -EBUSY;
    }
    if (r < 0) {
        vd_mutex_unlock(&job_mutex);
        return r;
    }
    job->finalizing = true;
    job_ref(job);
    vd_mutex_unlock(&job_mutex);
    job_do_finalize(job);
    job_unref(job);
    return 0;
}

int job_user_dismiss(Job *job, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    int r = verb_check(job, JOB_VERB_DISMISS, errp);
    Job *drop = r == 0 ? job_do_dismiss_locked(job) : NULL;
    unlock_and_flush();
    job_unref(drop);
    return r;
}

int job_set_speed(Job *job, int64_t speed, VdError **errp)
{
    vd_mutex_lock(&job_mutex);
    int r = verb_check(job, JOB_VERB_SET_SPEED, errp);
    if (r == 0 && speed < 0) {
        vd_error_setg(errp, EINVAL, "Invalid parameter 'speed'");
        r = -EINVAL;
    }
    if (r == 0) {
        job->speed = (uint64_t)speed;
        job_kick(job);
    }
    vd_mutex_unlock(&job_mutex);
    return r;
}

/* ---- queries ---- */

static const char *iostatus_name(IoStatus s)
{
    return s == IOSTATUS_FAILED ? "failed" : s == IOSTATUS_NOSPACE ? "nospace" : "ok";
}

json_t *job_query_info(Job *job)
{
    vd_mutex_lock(&job_mutex);
    json_t *o = json_pack("{s:s, s:s, s:s, s:I, s:I}", "id", job->id, "type", job->drv->type,
                          "status", job_status_name(job->status),
                          "current-progress", (json_int_t)job->progress_current,
                          "total-progress", (json_int_t)job->progress_total);
    if (o && job->error && (job->status == JOB_STATUS_CONCLUDED ||
                            job->status == JOB_STATUS_ABORTING)) {
        json_object_set_new(o, "error", json_string(job->error));
    }
    vd_mutex_unlock(&job_mutex);
    return o;
}

json_t *job_query_block_info(Job *job)
{
    vd_mutex_lock(&job_mutex);
    bool ready = job->status == JOB_STATUS_READY || job->status == JOB_STATUS_STANDBY;
    json_t *o = json_pack("{s:s, s:s, s:I, s:I, s:b, s:b, s:I, s:s, s:b, s:s, s:b, s:b}",
                          "device", job->device, "type", job->drv->type,
                          "len", (json_int_t)job->progress_total,
                          "offset", (json_int_t)job->progress_current,
                          "busy", job->busy, "paused", job->pause_count > 0,
                          "speed", (json_int_t)job->speed,
                          "io-status", iostatus_name(job->iostatus), "ready", ready,
                          "status", job_status_name(job->status),
                          "auto-finalize", job->auto_finalize, "auto-dismiss", job->auto_dismiss);
    if (o && job->error && (job->status == JOB_STATUS_CONCLUDED ||
                            job->status == JOB_STATUS_ABORTING)) {
        json_object_set_new(o, "error", json_string(job->error));
    }
    if (o && job->node) {
        /* vdisk: the node it works on, so a job with its own id is found by its disk's name */
        json_object_set_new(o, "vdisk-node", json_string(job->node));
    }
    if (o && job->drv->query) {
        job->drv->query(job, o);
    }
    vd_mutex_unlock(&job_mutex);
    return o;
}

/* ---- driver side (job thread) ---- */

uint64_t job_get_speed(Job *job)
{
    vd_mutex_lock(&job_mutex);
    uint64_t s = job->speed;
    vd_mutex_unlock(&job_mutex);
    return s;
}

void job_set_busy(Job *job, bool busy)
{
    vd_mutex_lock(&job_mutex);
    job->busy = busy;
    vd_mutex_unlock(&job_mutex);
}

bool job_is_cancelled(Job *job)
{
    vd_mutex_lock(&job_mutex);
    bool c = job->cancelled && job->force_cancel;
    vd_mutex_unlock(&job_mutex);
    return c;
}

bool job_cancel_requested(Job *job)
{
    vd_mutex_lock(&job_mutex);
    bool c = job->cancelled;
    vd_mutex_unlock(&job_mutex);
    return c;
}

bool job_is_ready(Job *job)
{
    vd_mutex_lock(&job_mutex);
    bool r = job->status == JOB_STATUS_READY || job->status == JOB_STATUS_STANDBY;
    vd_mutex_unlock(&job_mutex);
    return r;
}

void job_pause_point(Job *job)
{
    vd_mutex_lock(&job_mutex);
    while (job->pause_count > 0 && !(job->cancelled && job->force_cancel)) {
        JobStatus resume_to = job->status;
        if (job->status == JOB_STATUS_RUNNING) {
            job_transition(job, JOB_STATUS_PAUSED);
        } else if (job->status == JOB_STATUS_READY) {
            job_transition(job, JOB_STATUS_STANDBY);
        }
        job->busy = false;
        job->parked = true;
        unlock_and_flush();
        vd_mutex_lock(&job_mutex);
        while (job->pause_count > 0 && !(job->cancelled && job->force_cancel)) {
            vd_cond_wait(&job->cond, &job_mutex);
        }
        job->parked = false;
        job->busy = true;
        if (job->status != resume_to) {
            job_transition(job, resume_to);
        }
        unlock_and_flush();
        vd_mutex_lock(&job_mutex);
    }
    vd_mutex_unlock(&job_mutex);
}

void job_sleep_ns(Job *job, uint64_t ns)
{
    vd_mutex_lock(&job_mutex);
    if (!job->kicked && ns > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t t = (uint64_t)ts.tv_nsec + ns % 1000000000ULL;
        ts.tv_sec += (time_t)(ns / 1000000000ULL + t / 1000000000ULL);
        ts.tv_nsec = (long)(t % 1000000000ULL);
        job->busy = false;
        while (!job->kicked) {
            if (vd_cond_timedwait(&job->cond, &job_mutex, &ts) == ETIMEDOUT) {
                break;
            }
        }
        job->busy = true;
    }
    job->kicked = false;
    vd_mutex_unlock(&job_mutex);
    job_pause_point(job);
}

void job_rate_limit(Job *job, uint64_t bytes)
{
    vd_mutex_lock(&job_mutex);
    uint64_t speed = job->speed;
    uint64_t delay = job_ratelimit_account(&job->rl, speed, job_now_ns(), bytes);
    vd_mutex_unlock(&job_mutex);
    uint64_t deadline = job_now_ns() + delay;
    while (delay > 0) {
        job_sleep_ns(job, delay);
        vd_mutex_lock(&job_mutex);
        bool stop = job->speed != speed || (job->cancelled && job->force_cancel);
        vd_mutex_unlock(&job_mutex);
        uint64_t now = job_now_ns();
        if (stop || now >= deadline) {
            break; /* a new speed applies from the next chunk */
        }
        delay = deadline - now;
    }
}

void job_transition_to_ready(Job *job)
{
    vd_mutex_lock(&job_mutex);
    /* A hard cancel of a job that was not yet ready stays one: no READY after it. */
    if (job->status == JOB_STATUS_RUNNING && !(job->cancelled && job->force_cancel)) {
        /* offset == len only together with READY: a cancel never sees one without the other */
        job->progress_total = job->progress_current;
        job_transition(job, JOB_STATUS_READY);
        queue_event("BLOCK_JOB_READY", block_event_data(job));
    }
    unlock_and_flush();
}

void job_progress_update(Job *job, uint64_t done)
{
    vd_mutex_lock(&job_mutex);
    job->progress_current += done;
    if (job->progress_total < job->progress_current) {
        job->progress_total = job->progress_current;
    }
    vd_mutex_unlock(&job_mutex);
}

void job_progress_set_remaining(Job *job, uint64_t remaining)
{
    vd_mutex_lock(&job_mutex);
    job->progress_total = job->progress_current + remaining;
    vd_mutex_unlock(&job_mutex);
}

void job_progress_get(Job *job, uint64_t *current, uint64_t *total)
{
    vd_mutex_lock(&job_mutex);
    *current = job->progress_current;
    *total = job->progress_total;
    vd_mutex_unlock(&job_mutex);
}

JobErrorAction job_handle_io_error(Job *job, JobErrorAction policy, bool is_read, int err)
{
    static const char *const names[] = {"report", "ignore", "stop"};
    if (policy == JOB_ERR_ENOSPC) {
        policy = (err == -ENOSPC || err == ENOSPC) ? JOB_ERR_STOP : JOB_ERR_REPORT;
    }
    vd_mutex_lock(&job_mutex);
    queue_event("BLOCK_JOB_ERROR", json_pack("{s:s, s:s, s:s}", "device", job->device,
                                             "operation", is_read ? "read" : "write",
                                             "action", names[policy]));
    if (policy == JOB_ERR_STOP) {
        job->iostatus = (err == -ENOSPC || err == ENOSPC) ? IOSTATUS_NOSPACE : IOSTATUS_FAILED;
        if (!job->user_paused) {
            job->user_paused = true;
            job->pause_count++;
        }
    }
    unlock_and_flush();
    return policy;
}
