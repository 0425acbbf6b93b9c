/*
 * test_job.c - the job framework: the status transition and verb tables (every pair, allowed and
 * refused), id rules, the rate limiter's arithmetic, and whole job lives driven by a fake driver on a
 * real job thread (ready/complete, soft and hard cancel, pause/resume, manual finalize/dismiss, error
 * "stop"), checked against the event sequences qemu-storage-daemon 7.2 emits. Then the mirror core
 * without NBD: a guest thread writes through the mirror-top filter (bracketed by the filter's tracker
 * exactly as NBD workers do) while the job copies; after pivot / soft cancel / hard cancel the target
 * and source are compared byte for byte with a model of what the guest wrote, and qemu-img check
 * must find the target clean.
 */
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "block/block.h"
#include "block/graph.h"
#include "block/tracking.h"
#include "block/write-hooks.h"
#include "jobs/copy.h"
#include "jobs/job.h"
#include "jobs/mirror.h"
#include "qmp/qmp.h"
#include "util/lock.h"

/* The library's qmp_event_emit may not be linked in unit tests: a weak fallback. */
__attribute__((weak)) void qmp_event_emit(const char *name, json_t *data)
{
    (void)name;
    json_decref(data);
}

/* The node graph may not be linked either (mirror's QMP entry uses it). */
__attribute__((weak)) BlockNode *graph_find_node(const char *node_name)
{
    (void)node_name;
    return NULL;
}

__attribute__((weak)) int graph_register(BlockNode *node, VdError **errp)
{
    (void)node;
    (void)errp;
    return -ENOTSUP;
}

/* ---- event capture ---- */

static pthread_mutex_t ev_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ev_cond = PTHREAD_COND_INITIALIZER;
static char ev_log[8192]; /* "name[:status]," */
static json_t *ev_last_completed;

static void sink(const char *name, json_t *data)
{
    vd_mutex_lock(&ev_lock);
    char item[128];
    if (!strcmp(name, "JOB_STATUS_CHANGE")) {
        snprintf(item, sizeof(item), "%s,", json_string_value(json_object_get(data, "status")));
    } else {
        snprintf(item, sizeof(item), "%s,", name);
    }
    if (!strcmp(name, "BLOCK_JOB_COMPLETED") || !strcmp(name, "BLOCK_JOB_CANCELLED") ||
        !strcmp(name, "BLOCK_JOB_READY") || !strcmp(name, "BLOCK_JOB_ERROR") ||
        !strcmp(name, "BLOCK_JOB_PENDING")) {
        json_decref(ev_last_completed);
        ev_last_completed = json_incref(data);
    }
    strncat(ev_log, item, sizeof(ev_log) - strlen(ev_log) - 1);
    vd_cond_broadcast(&ev_cond);
    vd_mutex_unlock(&ev_lock);
    json_decref(data);
}

static void ev_reset(void)
{
    vd_mutex_lock(&ev_lock);
    ev_log[0] = 0;
    json_decref(ev_last_completed);
    ev_last_completed = NULL;
    vd_mutex_unlock(&ev_lock);
}

/* Wait (up to 5 s) until the log ends with suffix. */
static bool ev_wait_suffix(const char *suffix)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 5;
    vd_mutex_lock(&ev_lock);
    bool ok = false;
    for (;;) {
        size_t l = strlen(ev_log), s = strlen(suffix);
        if (l >= s && !strcmp(ev_log + l - s, suffix)) {
            ok = true;
            break;
        }
        if (vd_cond_timedwait(&ev_cond, &ev_lock, &ts) != 0) {
            break;
        }
    }
    if (!ok) {
        fprintf(stderr, "events so far: %s\n(wanted suffix %s)\n", ev_log, suffix);
    }
    vd_mutex_unlock(&ev_lock);
    return ok;
}

static void assert_events(const char *expected)
{
    assert_true(ev_wait_suffix(expected));
    vd_mutex_lock(&ev_lock);
    assert_string_equal(ev_log, expected);
    vd_mutex_unlock(&ev_lock);
}

/* ---- the tables ---- */

static const char *const S = "UCRPYSWDXEN";

static void test_transition_table(void **state)
{
    /* QEMU 7.2's table, written out as the allowed pairs "from to". */
    static const char *const allowed[] = {"UC", "CR", "CX", "CN", "RP", "RY", "RW", "RX", "PR",
                                          "YS", "YW", "YX", "SY", "WD", "WX", "DX", "DE", "XX",
                                          "XE", "EN", NULL};
    int n_allowed = 0;
    for (int f = 0; f < JOB_STATUS__MAX; f++) {
        for (int t = 0; t < JOB_STATUS__MAX; t++) {
            char pair[3] = {S[f], S[t], 0};
            bool want = false;
            for (const char *const *a = allowed; *a; a++) {
                want |= !strcmp(*a, pair);
            }
            if (job_transition_allowed((JobStatus)f, (JobStatus)t) != want) {
                fail_msg("transition %s -> %s: expected %s", job_status_name((JobStatus)f),
                         job_status_name((JobStatus)t), want ? "allowed" : "refused");
            }
            n_allowed += want;
        }
    }
    assert_int_equal(n_allowed, 20);
    assert_false(job_transition_allowed(JOB_STATUS__MAX, JOB_STATUS_CREATED));
    assert_false(job_transition_allowed(JOB_STATUS_CREATED, (JobStatus)-1));
}

static void test_verb_table(void **state)
{
    static const struct {
        JobVerb verb;
        const char *states; /* letters of S where the verb is accepted */
    } rows[] = {
        {JOB_VERB_CANCEL, "CRPYSWD"}, {JOB_VERB_PAUSE, "CRPYS"},    {JOB_VERB_RESUME, "CRPYS"},
        {JOB_VERB_SET_SPEED, "CRPYS"}, {JOB_VERB_COMPLETE, "YS"},   {JOB_VERB_DISMISS, "E"},
        {JOB_VERB_FINALIZE, "D"},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        for (int s = 0; s < JOB_STATUS__MAX; s++) {
            bool want = strchr(rows[i].states, S[s]) != NULL;
            if (job_verb_allowed(rows[i].verb, (JobStatus)s) != want) {
                fail_msg("verb %s in %s: expected %s", job_verb_name(rows[i].verb),
                         job_status_name((JobStatus)s), want ? "allowed" : "refused");
            }
        }
    }
}

static void test_names(void **state)
{
    assert_string_equal(job_status_name(JOB_STATUS_STANDBY), "standby");
    assert_string_equal(job_status_name(JOB_STATUS_NULL), "null");
    assert_string_equal(job_verb_name(JOB_VERB_SET_SPEED), "set-speed");
    assert_string_equal(job_verb_name(JOB_VERB_FINALIZE), "finalize");
}

static void test_id_wellformed(void **state)
{
    assert_true(job_id_wellformed("j1"));
    assert_true(job_id_wellformed("drive-virtio0.x_y"));
    assert_false(job_id_wellformed(""));
    assert_false(job_id_wellformed(NULL));
    assert_false(job_id_wellformed("1job"));
    assert_false(job_id_wellformed("#block1"));
    assert_false(job_id_wellformed("a b"));
}

static void test_error_action_parse(void **state)
{
    JobErrorAction a;
    assert_int_equal(job_error_action_parse("stop", &a), 0);
    assert_int_equal(a, JOB_ERR_STOP);
    assert_int_equal(job_error_action_parse(NULL, &a), 0);
    assert_int_equal(a, JOB_ERR_REPORT);
    assert_int_equal(job_error_action_parse("ignore", &a), 0);
    assert_int_equal(a, JOB_ERR_IGNORE);
    assert_int_equal(job_error_action_parse("enospc", &a), 0);
    assert_int_equal(a, JOB_ERR_ENOSPC);
    assert_int_equal(job_error_action_parse("bogus", &a), -EINVAL);
}

static void test_ratelimit(void **state)
{
    JobRateLimit rl = {0};
    uint64_t t = 10ULL * 1000000000ULL;
    /* Unlimited: never waits. */
    assert_int_equal(job_ratelimit_account(&rl, 0, t, 1 << 30), 0);
    /* 1 MiB/s: the first 100 ms worth is a free burst, then each MiB costs a second. */
    rl = (JobRateLimit){0};
    assert_int_equal(job_ratelimit_account(&rl, 1 << 20, t, 1 << 16), 0);
    uint64_t d = job_ratelimit_account(&rl, 1 << 20, t, 1 << 20);
    /* paid up to t - 100ms + 62.5ms + 1s -> wait 962.5 ms */
    assert_int_equal(d, 962500000ULL);
    /* After a long idle period, the debt is gone again. */
    assert_int_equal(job_ratelimit_account(&rl, 1 << 20, t + 5000000000ULL, 1 << 16), 0);
}

/* ---- a fake driver on a real job thread ---- */

typedef struct Fake {
    int iterations;         /* loops done */
    int ready_after;        /* go READY after this many loops (-1 = never) */
    int fail_with;          /* run returns this after ready_after loops (0 = no) */
    bool should_complete;
    int prepare_ret;
    int committed, aborted, cleaned, freed;
    bool stop_on_error;     /* exercise job_handle_io_error(STOP) once */
    bool error_reported;
    int off_qmp_thread;     /* finalization steps that ran while a QMP thread ran elsewhere */
    int ready_progress;     /* offset reached when going READY, of 100 (0 = all 100) */
    bool ready_when_cancelled; /* try to go READY after a hard cancel (must be a no-op) */
} Fake;

/* Finalization steps change the graph: with a QMP server running they must run on its thread. */
static void fake_note_thread(Fake *f)
{
    if (!qmp_on_thread()) {
        f->off_qmp_thread++;
    }
}

static int fake_run(Job *job, VdError **errp)
{
    Fake *f = job_opaque(job);
    job_progress_set_remaining(job, 100);
    for (;;) {
        if (job_is_cancelled(job)) {
            if (f->ready_when_cancelled) {
                job_transition_to_ready(job);
            }
            return -ECANCELED;
        }
        if (job_is_ready(job) && (f->should_complete || job_cancel_requested(job))) {
            return 0;
        }
        if (f->stop_on_error && !f->error_reported && f->iterations == 2) {
            f->error_reported = true;
            job_handle_io_error(job, JOB_ERR_STOP, false, -EIO);
        }
        f->iterations++;
        if (f->fail_with && f->iterations > f->ready_after) {
            vd_error_setg(errp, -f->fail_with, "fake failure");
            return f->fail_with;
        }
        if (f->ready_after >= 0 && f->iterations == f->ready_after) {
            job_progress_update(job, f->ready_progress ? (uint64_t)f->ready_progress : 100);
            job_transition_to_ready(job);
        }
        job_sleep_ns(job, 2000000); /* 2 ms */
    }
}

static int fake_complete(Job *job, VdError **errp)
{
    ((Fake *)job_opaque(job))->should_complete = true;
    return 0;
}

static bool fake_cancel(Job *job, bool force, bool ready)
{
    return force || !ready;
}

static int fake_prepare(Job *job, VdError **errp)
{
    Fake *f = job_opaque(job);
    fake_note_thread(f);
    if (f->prepare_ret) {
        vd_error_setg(errp, -f->prepare_ret, "prepare failed");
    }
    return f->prepare_ret;
}

static void fake_commit(Job *job) { ((Fake *)job_opaque(job))->committed++; }
static void fake_abort(Job *job)
{
    fake_note_thread(job_opaque(job));
    ((Fake *)job_opaque(job))->aborted++;
}
static void fake_clean(Job *job)
{
    fake_note_thread(job_opaque(job));
    ((Fake *)job_opaque(job))->cleaned++;
}
static void fake_free(Job *job) { ((Fake *)job_opaque(job))->freed++; }

static const JobDriver fake_driver = {
    .type = "mirror",
    .run = fake_run,
    .complete = fake_complete,
    .cancel = fake_cancel,
    .prepare = fake_prepare,
    .commit = fake_commit,
    .abort = fake_abort,
    .clean = fake_clean,
    .free = fake_free,
};

static Job *start_fake(Fake *f, const char *id, bool auto_finalize, bool auto_dismiss)
{
    ev_reset();
    JobOptions o = {.id = id, .auto_finalize = auto_finalize, .auto_dismiss = auto_dismiss};
    VdError *err = NULL;
    Job *job = job_create(&fake_driver, &o, f, &err);
    assert_non_null(job);
    job_ref(job); /* the test's */
    assert_int_equal(job_start(job, &err), 0);
    return job;
}

static void wait_status(Job *job, JobStatus s)
{
    /* at most 150 s of wall time (the suite's limit is 300): in meson's parallel ASan run a
     * mirror whose guest keeps writing copies at its guest-priority floor, and 60 s was seen
     * to fall short once under that load (alone the whole suite takes 18 s) */
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 1500000 && job_status(job) != s; i++) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 150) {
            break;
        }
        usleep(1000);
    }
    assert_string_equal(job_status_name(job_status(job)), job_status_name(s));
}

/*
 * With a QMP server running, a job's end (prepare/commit/abort/clean, which pivot exports and drop
 * nodes) runs on the QMP thread, never on the job's own thread: the graph has a single writer.
 */
static void test_completion_runs_on_qmp_thread(void **state)
{
    char path[] = "/tmp/vdisk-test-job-qmp-XXXXXX";
    assert_non_null(mkdtemp(path));
    char sock[128];
    snprintf(sock, sizeof(sock), "%s/qmp.sock", path);
    VdError *err = NULL;
    assert_int_equal(qmp_server_start(sock, &err), 0);
    assert_false(qmp_on_thread());

    /* Success with auto-finalize: prepare, commit, clean. */
    Fake f = {.ready_after = 1};
    Job *job = start_fake(&f, "jq1", true, true);
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_int_equal(f.committed, 1);
    assert_int_equal(f.cleaned, 1);
    assert_int_equal(f.off_qmp_thread, 0);
    job_unref(job);

    /* Hard cancel: abort, clean. */
    Fake g = {.ready_after = -1};
    job = start_fake(&g, "jq2", true, true);
    wait_status(job, JOB_STATUS_RUNNING);
    assert_int_equal(job_user_cancel(job, true, &err), 0);
    job_wait_thread(job);
    assert_int_equal(g.aborted, 1);
    assert_int_equal(g.cleaned, 1);
    assert_int_equal(g.off_qmp_thread, 0);
    job_unref(job);

    qmp_server_stop();
    rmdir(path);
    /* Without a QMP thread the job's own thread finishes the job (unit tests, shutdown). */
    Fake h = {.ready_after = 1};
    job = start_fake(&h, "jq3", true, true);
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_int_equal(h.committed, 1);
    job_unref(job);
}

static void test_ready_complete_auto(void **state)
{
    Fake f = {.ready_after = 3};
    Job *job = start_fake(&f, "j1", true, true);
    VdError *err = NULL;
    wait_status(job, JOB_STATUS_READY);
    Job *found = job_find("j1");
    assert_ptr_equal(found, job);
    job_unref(found);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_events("created,running,ready,BLOCK_JOB_READY,waiting,pending,BLOCK_JOB_COMPLETED,"
                  "concluded,null,");
    assert_null(json_object_get(ev_last_completed, "error"));
    assert_int_equal(json_integer_value(json_object_get(ev_last_completed, "offset")), 100);
    assert_int_equal(f.committed, 1);
    assert_int_equal(f.aborted, 0);
    assert_int_equal(f.cleaned, 1);
    assert_null(job_find("j1"));
    job_unref(job);
    assert_int_equal(f.freed, 1);
}

/* offset == len exactly when READY (libvirt reads it as ready), never before. */
static void test_ready_sets_offset_to_len(void **state)
{
    Fake f = {.ready_after = 2, .ready_progress = 60};
    Job *job = start_fake(&f, "jr", true, true);
    VdError *err = NULL;
    wait_status(job, JOB_STATUS_READY);
    uint64_t cur, total;
    job_progress_get(job, &cur, &total);
    assert_int_equal(cur, 60);
    assert_int_equal(total, 60);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    job_unref(job);
}

/* A job hard-cancelled before READY never becomes READY, and its offset stays below len. */
static void test_no_ready_after_hard_cancel(void **state)
{
    Fake f = {.ready_after = -1, .ready_when_cancelled = true};
    Job *job = start_fake(&f, "jc", true, true);
    VdError *err = NULL;
    wait_status(job, JOB_STATUS_RUNNING);
    assert_int_equal(job_user_cancel(job, false, &err), 0);
    job_wait_thread(job);
    assert_events("created,running,aborting,BLOCK_JOB_CANCELLED,concluded,null,");
    uint64_t cur, total;
    job_progress_get(job, &cur, &total);
    assert_true(cur < total);
    job_unref(job);
}

static void test_verbs_refused_with_qemu_messages(void **state)
{
    Fake f = {.ready_after = -1};
    Job *job = start_fake(&f, "j2", true, true);
    VdError *err = NULL;
    /* Complete before ready. */
    assert_int_equal(job_user_complete(job, &err), -EPERM);
    assert_string_equal(vd_error_msg(err),
                        "Job 'j2' in state 'running' cannot accept command verb 'complete'");
    vd_error_free(err);
    err = NULL;
    assert_int_equal(job_user_finalize(job, &err), -EPERM);
    vd_error_free(err);
    err = NULL;
    assert_int_equal(job_user_dismiss(job, &err), -EPERM);
    vd_error_free(err);
    err = NULL;
    assert_int_equal(job_user_resume(job, &err), -EINVAL);
    assert_string_equal(vd_error_msg(err), "Can't resume a job that was not paused");
    vd_error_free(err);
    err = NULL;
    assert_int_equal(job_set_speed(job, -1, &err), -EINVAL);
    vd_error_free(err);
    err = NULL;
    /* Duplicate id. */
    JobOptions o = {.id = "j2"};
    assert_null(job_create(&fake_driver, &o, &f, &err));
    vd_error_free(err);
    err = NULL;
    assert_int_equal(job_set_speed(job, 1 << 20, &err), 0);
    json_t *info = job_query_block_info(job);
    assert_int_equal(json_integer_value(json_object_get(info, "speed")), 1 << 20);
    assert_string_equal(json_string_value(json_object_get(info, "status")), "running");
    assert_false(json_is_true(json_object_get(info, "ready")));
    json_decref(info);
    /* Cancel before ready: aborting, CANCELLED, concluded, null. */
    assert_int_equal(job_user_cancel(job, false, &err), 0);
    job_wait_thread(job);
    assert_events("created,running,aborting,BLOCK_JOB_CANCELLED,concluded,null,");
    assert_int_equal(f.aborted, 1);
    assert_int_equal(f.committed, 0);
    job_unref(job);
}

static void test_pause_resume_running_and_ready(void **state)
{
    Job *found;
    Fake f = {.ready_after = -1};
    Job *job = start_fake(&f, "j3", true, false);
    VdError *err = NULL;
    assert_int_equal(job_user_pause(job, &err), 0);
    wait_status(job, JOB_STATUS_PAUSED);
    assert_int_equal(job_user_pause(job, &err), -EBUSY);
    assert_string_equal(vd_error_msg(err), "Job is already paused");
    vd_error_free(err);
    err = NULL;
    json_t *info = job_query_block_info(job);
    assert_true(json_is_true(json_object_get(info, "paused")));
    assert_false(json_is_true(json_object_get(info, "busy")));
    json_decref(info);
    int it = f.iterations;
    usleep(20000);
    assert_int_equal(f.iterations, it); /* really paused */
    assert_int_equal(job_user_resume(job, &err), 0);
    wait_status(job, JOB_STATUS_RUNNING);
    f.ready_after = f.iterations + 2;
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_pause(job, &err), 0);
    wait_status(job, JOB_STATUS_STANDBY);
    /* Complete is accepted by the table in standby but refused while paused (as QEMU). */
    assert_int_equal(job_user_complete(job, &err), -EBUSY);
    vd_error_free(err);
    err = NULL;
    assert_int_equal(job_user_resume(job, &err), 0);
    wait_status(job, JOB_STATUS_READY);
    /* Soft cancel of a ready job = finish without pivot: completes successfully. */
    assert_int_equal(job_user_cancel(job, false, &err), 0);
    job_wait_thread(job);
    assert_events("created,running,paused,running,ready,BLOCK_JOB_READY,standby,ready,waiting,"
                  "pending,BLOCK_JOB_COMPLETED,concluded,");
    assert_int_equal(job_status(job), JOB_STATUS_CONCLUDED);
    found = job_find("j3");
    assert_ptr_equal(found, job);
    job_unref(found);
    json_t *q = job_query_info(job);
    assert_null(json_object_get(q, "error"));
    json_decref(q);
    assert_int_equal(job_user_dismiss(job, &err), 0);
    assert_null(job_find("j3"));
    job_unref(job);
}

static void test_manual_finalize(void **state)
{
    Fake f = {.ready_after = 1};
    Job *job = start_fake(&f, "j4", false, false);
    VdError *err = NULL;
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_events("created,running,ready,BLOCK_JOB_READY,waiting,pending,BLOCK_JOB_PENDING,");
    assert_string_equal(json_string_value(json_object_get(ev_last_completed, "id")), "j4");
    assert_int_equal(f.committed, 0);
    assert_int_equal(job_user_finalize(job, &err), 0);
    assert_events("created,running,ready,BLOCK_JOB_READY,waiting,pending,BLOCK_JOB_PENDING,"
                  "BLOCK_JOB_COMPLETED,concluded,");
    assert_int_equal(f.committed, 1);
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
}

static void test_cancel_pending(void **state)
{
    Fake f = {.ready_after = 1};
    Job *job = start_fake(&f, "j5", false, true);
    VdError *err = NULL;
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_int_equal(job_status(job), JOB_STATUS_PENDING);
    assert_int_equal(job_user_cancel(job, false, &err), 0);
    assert_events("created,running,ready,BLOCK_JOB_READY,waiting,pending,BLOCK_JOB_PENDING,"
                  "aborting,BLOCK_JOB_CANCELLED,concluded,null,");
    assert_int_equal(f.aborted, 1);
    job_unref(job);
}

static void test_failure_and_prepare_failure(void **state)
{
    Fake f = {.ready_after = 2, .fail_with = -EIO};
    Job *job = start_fake(&f, "j6", true, false);
    job_wait_thread(job);
    assert_events("created,running,ready,BLOCK_JOB_READY,aborting,BLOCK_JOB_COMPLETED,concluded,");
    assert_string_equal(json_string_value(json_object_get(ev_last_completed, "error")),
                        "fake failure");
    json_t *q = job_query_block_info(job);
    assert_string_equal(json_string_value(json_object_get(q, "error")), "fake failure");
    json_decref(q);
    VdError *err = NULL;
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);

    Fake g = {.ready_after = 1, .prepare_ret = -ENOSPC};
    job = start_fake(&g, "j7", true, true);
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_events("created,running,ready,BLOCK_JOB_READY,waiting,pending,aborting,"
                  "BLOCK_JOB_COMPLETED,concluded,null,");
    assert_string_equal(json_string_value(json_object_get(ev_last_completed, "error")),
                        "prepare failed");
    assert_int_equal(g.committed, 0);
    assert_int_equal(g.aborted, 1);
    job_unref(job);
}

static void test_error_stop_pauses_until_resume(void **state)
{
    Fake f = {.ready_after = -1, .stop_on_error = true};
    Job *job = start_fake(&f, "j8", true, true);
    wait_status(job, JOB_STATUS_PAUSED);
    json_t *q = job_query_block_info(job);
    assert_string_equal(json_string_value(json_object_get(q, "io-status")), "failed");
    json_decref(q);
    assert_string_equal(json_string_value(json_object_get(ev_last_completed, "action")), "stop");
    assert_string_equal(json_string_value(json_object_get(ev_last_completed, "operation")), "write");
    VdError *err = NULL;
    assert_int_equal(job_user_resume(job, &err), 0);
    wait_status(job, JOB_STATUS_RUNNING);
    /* Hard cancel of a paused job resumes it and aborts. */
    assert_int_equal(job_user_pause(job, &err), 0);
    wait_status(job, JOB_STATUS_PAUSED);
    assert_int_equal(job_user_cancel(job, true, &err), 0);
    job_wait_thread(job);
    assert_events("created,running,BLOCK_JOB_ERROR,paused,running,paused,running,aborting,"
                  "BLOCK_JOB_CANCELLED,concluded,null,");
    job_unref(job);
}

static void test_cancel_all_sync_for_shutdown(void **state)
{
    Fake run = {.ready_after = -1}, pend = {.ready_after = 1}, conc = {.ready_after = 1};
    VdError *err = NULL;
    Job *jc = start_fake(&conc, "s3", true, false);
    wait_status(jc, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(jc, &err), 0);
    job_wait_thread(jc);
    Job *jp = start_fake(&pend, "s2", false, false);
    wait_status(jp, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(jp, &err), 0);
    job_wait_thread(jp);
    assert_int_equal(job_status(jp), JOB_STATUS_PENDING);
    Job *jr = start_fake(&run, "s1", true, false);
    assert_int_equal(job_user_pause(jr, &err), 0); /* even a paused job stops */
    wait_status(jr, JOB_STATUS_PAUSED);
    job_cancel_all_sync();
    assert_null(job_find("s1"));
    assert_null(job_find("s2"));
    assert_null(job_find("s3"));
    assert_int_equal(run.aborted, 1);
    assert_int_equal(pend.aborted, 1);
    assert_int_equal(pend.committed, 0);
    assert_int_equal(conc.committed, 1);
    assert_int_equal(job_status(jr), JOB_STATUS_NULL);
    job_unref(jr);
    job_unref(jp);
    job_unref(jc);
    assert_int_equal(run.freed + pend.freed + conc.freed, 3);
}

/* ---- mirror core ---- */

#define MSIZE (4u << 20)

typedef struct Guest {
    BlockNode *filter;
    BlockTracker *tracker;
    uint8_t *model;      /* what the guest must read */
    bool stop;           /* atomic: set by the test thread */
    unsigned seed;
    unsigned pause_us;   /* between requests: sets how fast this guest dirties the disk */
    unsigned max_len;    /* longest request */
    int ops;
    int errors;
} Guest;

/* Random writes, zero writes and discards through the filter, like NBD workers issue them. */
/* Wait (up to 15 s: the machine is shared) until the guest has completed at least n requests. */
static bool wait_guest_ops(Guest *g, int n)
{
    for (int i = 0; i < 15000; i++) {
        if (__atomic_load_n(&g->ops, __ATOMIC_ACQUIRE) >= n) {
            return true;
        }
        usleep(1000);
    }
    return false;
}

static void *guest_thread(void *arg)
{
    Guest *g = arg;
    uint8_t *buf = malloc(256 * 1024);
    while (!__atomic_load_n(&g->stop, __ATOMIC_ACQUIRE) && buf) {
        unsigned r = rand_r(&g->seed);
        uint64_t len = 1 + rand_r(&g->seed) % g->max_len;
        uint64_t off = (uint64_t)rand_r(&g->seed) % (MSIZE - len);
        BtRequest req;
        block_tracker_begin(g->tracker, &req, off, len, BT_EXCLUSIVE);
        int e;
        if (r % 10 < 7) {
            memset(buf, (int)(1 + g->ops % 250), len);
            e = vd_pwrite(g->filter, off, len, buf, 0);
            if (!e) {
                memcpy(g->model + off, buf, len);
            }
        } else if (r % 10 < 9) {
            e = vd_pwrite_zeroes(g->filter, off, len, (r & 1) ? VD_REQ_MAY_UNMAP : 0);
            if (!e) {
                memset(g->model + off, 0, len);
            }
        } else {
            /* What a discard reads is the format's choice: learn it while holding the range. */
            e = vd_pdiscard(g->filter, off, len, 0);
            if (!e) {
                e = vd_pread(g->filter, off, len, g->model + off);
            }
        }
        block_tracker_end(g->tracker, &req);
        g->errors += e != 0;
        __atomic_add_fetch(&g->ops, 1, __ATOMIC_RELEASE); /* read by the test thread */
        usleep(g->pause_us);
    }
    free(buf);
    return NULL;
}

typedef struct MirrorEnv {
    char dir[64];
    char base[128], top[128], tgt[128];
    BlockNode *source;
    BlockNode *target;
    uint8_t *model;
} MirrorEnv;

static void fill(BlockNode *bs, uint64_t off, uint64_t len, int pattern)
{
    uint8_t *b = malloc(len);
    assert_non_null(b);
    memset(b, pattern, len);
    assert_int_equal(vd_pwrite(bs, off, len, b, 0), 0);
    free(b);
}

/* base: data in [0, 1M) and [3M, 3.5M); top (over base): [1M, 2M) and a zeroed [3M+64K, 3M+128K). */
static void mirror_env_setup(MirrorEnv *env, bool backing)
{
    VdError *err = NULL;
    strcpy(env->dir, "/tmp/vdisk-test-job-XXXXXX");
    assert_non_null(mkdtemp(env->dir));
    snprintf(env->base, sizeof(env->base), "%s/base.qcow2", env->dir);
    snprintf(env->top, sizeof(env->top), "%s/top.qcow2", env->dir);
    snprintf(env->tgt, sizeof(env->tgt), "%s/tgt.qcow2", env->dir);
    VdCreateOptions co = {.format = "qcow2", .size = MSIZE, .size_given = true};
    assert_int_equal(vd_create(&co, env->base, &err), 0);
    BlockNode *b = vd_open_image(env->base, "qcow2", VD_OPEN_RDWR, &err);
    assert_non_null(b);
    fill(b, 0, 1 << 20, 0x11);
    fill(b, 3 << 20, 512 << 10, 0x33);
    vd_node_unref(b);
    VdCreateOptions ct = {.format = "qcow2", .backing_file = "base.qcow2", .backing_fmt = "qcow2"};
    assert_int_equal(vd_create(&ct, env->top, &err), 0);
    env->source = vd_open_image(env->top, "qcow2", VD_OPEN_RDWR, &err);
    assert_non_null(env->source);
    fill(env->source, 1 << 20, 1 << 20, 0x22);
    assert_int_equal(vd_pwrite_zeroes(env->source, (3 << 20) + 65536, 65536, 0), 0);
    env->model = malloc(MSIZE);
    assert_int_equal(vd_pread(env->source, 0, MSIZE, env->model), 0);

    VdCreateOptions cg = {.format = "qcow2", .size = MSIZE, .size_given = true,
                          .backing_file = backing ? env->base : NULL,
                          .backing_fmt = backing ? "qcow2" : NULL, .unsafe = true};
    assert_int_equal(vd_create(&cg, env->tgt, &err), 0);
    env->target = vd_open_image(env->tgt, "qcow2", VD_OPEN_RDWR | VD_OPEN_NO_BACKING, &err);
    assert_non_null(env->target);
}

static void assert_check_clean(const char *file);

/* Close everything, then qemu-img check both images (they must be closed: image locks). */
static void mirror_env_teardown(MirrorEnv *env)
{
    char cmd[256];
    vd_node_unref(env->source);
    vd_node_unref(env->target);
    free(env->model);
    assert_check_clean(env->tgt);
    assert_check_clean(env->top);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", env->dir);
    assert_int_equal(system(cmd), 0);
}

static void assert_image_reads(const char *file, const uint8_t *model)
{
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(file, "qcow2", 0, &err);
    assert_non_null(bs);
    uint8_t *buf = malloc(MSIZE);
    assert_int_equal(vd_pread(bs, 0, MSIZE, buf), 0);
    for (uint64_t i = 0; i < MSIZE; i++) {
        if (buf[i] != model[i]) {
            fail_msg("%s: byte %llu is 0x%02x, the guest wrote 0x%02x", file,
                     (unsigned long long)i, buf[i], model[i]);
        }
    }
    free(buf);
    vd_node_unref(bs);
}

static void assert_check_clean(const char *file)
{
    char cmd[256];
    if (system("qemu-img --version >/dev/null 2>&1") != 0) {
        return;
    }
    snprintf(cmd, sizeof(cmd), "qemu-img check -q -f qcow2 '%s'", file);
    assert_int_equal(system(cmd), 0);
}

static Job *start_mirror(MirrorEnv *env, const char *id, bool write_blocking, int64_t speed)
{
    ev_reset();
    MirrorOptions o = {.job_id = id, .source = env->source, .target = env->target,
                       .base = env->source->backing, .target_new = true, .speed = speed,
                       .write_blocking = write_blocking, .auto_finalize = true,
                       .auto_dismiss = false, .granularity = 65536};
    VdError *err = NULL;
    Job *job = mirror_start(&o, &err);
    if (!job) {
        fail_msg("mirror_start: %s", vd_error_msg(err));
    }
    job_ref(job);
    return job;
}

/* A guest thread; pause_us/max_len set how fast it dirties the disk. */
static void run_guest_at(Guest *g, pthread_t *th, Job *job, uint8_t *model, unsigned seed,
                         unsigned pause_us, unsigned max_len)
{
    memset(g, 0, sizeof(*g));
    g->pause_us = pause_us;
    g->max_len = max_len;
    g->filter = mirror_filter_node(job);
    assert_non_null(g->filter);
    g->tracker = block_tracker_get(g->filter);
    g->model = model;
    g->seed = seed;
    assert_int_equal(pthread_create(th, NULL, guest_thread, g), 0);
}

/* <= 100 requests/s, <= 64 KiB of copy work each: slower than the copy, so background converges. */
static void run_guest(Guest *g, pthread_t *th, Job *job, uint8_t *model, unsigned seed)
{
    run_guest_at(g, th, job, model, seed, 10000, 16 * 1024);
}

static void stop_guest(Guest *g, pthread_t th)
{
    __atomic_store_n(&g->stop, true, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    block_tracker_put(g->tracker);
    assert_int_equal(g->errors, 0);
}

static void mirror_pivot_case(bool write_blocking)
{
    MirrorEnv env;
    mirror_env_setup(&env, true);
    /* Slow enough that the guest writes while the copy is still running. */
    Job *job = start_mirror(&env, "m1", write_blocking, 16 << 20);
    /* Two guest threads, like two NBD workers: overlapping writes serialise on the tracker. */
    Guest g, g2;
    pthread_t th, th2;
    if (write_blocking) {
        /* Nothing to converge: hammer it, so a copy racing a guest write would show. */
        run_guest_at(&g, &th, job, env.model, 7, 300, 200 * 1024);
        run_guest_at(&g2, &th2, job, env.model, 8, 300, 200 * 1024);
    } else {
        run_guest(&g, &th, job, env.model, 7);
        run_guest(&g2, &th2, job, env.model, 8);
    }
    wait_status(job, JOB_STATUS_READY);
    /* Keep writing while ready: each guest completes more requests after READY. */
    int after_ready = __atomic_load_n(&g.ops, __ATOMIC_ACQUIRE);
    int after_ready2 = __atomic_load_n(&g2.ops, __ATOMIC_ACQUIRE);
    assert_true(wait_guest_ops(&g, after_ready + 3) && wait_guest_ops(&g2, after_ready2 + 3));
    assert_true(wait_guest_ops(&g, 6) && wait_guest_ops(&g2, 6));
    json_t *q = job_query_block_info(job);
    assert_true(json_integer_value(json_object_get(q, "offset")) > 0);
    /* The guests dirty slower than the copy runs: background mode converges by itself. */
    assert_string_equal(json_string_value(json_object_get(q, "vdisk-copy-mode")),
                        write_blocking ? "write-blocking" : "background");
    assert_false(json_is_true(json_object_get(q, "vdisk-auto-write-blocking")));
    json_decref(q);
    stop_guest(&g, th);
    stop_guest(&g2, th2);
    VdError *err = NULL;
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_true(ev_wait_suffix("BLOCK_JOB_COMPLETED,concluded,"));
    assert_null(mirror_filter_node(job));
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
    /* After the pivot the target's backing is base again, in memory and on disk. */
    assert_ptr_equal(env.target->backing, env.source->backing);
    assert_int_equal(vd_flush(env.target), 0);
    assert_image_reads(env.tgt, env.model);
    assert_image_reads(env.top, env.model);
    /* Sparse: base's data was not copied (target holds about top's 1 MiB plus guest writes). */
    mirror_env_teardown(&env);
}

static void test_mirror_pivot_background(void **state)
{
    mirror_pivot_case(false);
}

static void test_mirror_pivot_write_blocking(void **state)
{
    mirror_pivot_case(true);
}

static void test_mirror_cancel_before_ready_leaves_source(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, true);
    Job *job = start_mirror(&env, "m2", false, 256 << 10); /* 256 KiB/s: never ready in time */
    Guest g;
    pthread_t th;
    run_guest(&g, &th, job, env.model, 11);
    usleep(150000);
    stop_guest(&g, th);
    assert_int_equal(job_status(job), JOB_STATUS_RUNNING);
    json_t *q = job_query_block_info(job);
    assert_true(json_integer_value(json_object_get(q, "offset")) <
                json_integer_value(json_object_get(q, "len")));
    json_decref(q);
    VdError *err = NULL;
    assert_int_equal(job_user_cancel(job, false, &err), 0);
    job_wait_thread(job);
    assert_true(ev_wait_suffix("aborting,BLOCK_JOB_CANCELLED,concluded,"));
    assert_null(mirror_filter_node(job));
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
    assert_null(env.target->backing == env.source ? env.target : NULL);
    assert_int_equal(vd_flush(env.source), 0);
    assert_image_reads(env.top, env.model);
    mirror_env_teardown(&env);
}

static void test_mirror_soft_cancel_after_ready_is_point_in_time(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, true);
    Job *job = start_mirror(&env, "m3", false, 0);
    Guest g;
    pthread_t th;
    run_guest(&g, &th, job, env.model, 13);
    wait_status(job, JOB_STATUS_READY);
    usleep(50000);
    stop_guest(&g, th);
    VdError *err = NULL;
    assert_int_equal(job_user_cancel(job, false, &err), 0); /* virsh blockjob --abort on ready */
    job_wait_thread(job);
    assert_true(ev_wait_suffix("waiting,pending,BLOCK_JOB_COMPLETED,concluded,"));
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
    /* No pivot: the guest's node is still the source, and the target is an exact copy. */
    assert_ptr_equal(env.target->backing, env.source->backing);
    assert_int_equal(vd_flush(env.target), 0);
    assert_image_reads(env.tgt, env.model);
    mirror_env_teardown(&env);
}

static void test_mirror_full_sync_no_backing(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, false);
    ev_reset();
    MirrorOptions o = {.job_id = "m4", .source = env.source, .target = env.target,
                       .base = NULL, .target_new = true, .auto_finalize = true,
                       .auto_dismiss = true};
    VdError *err = NULL;
    Job *job = mirror_start(&o, &err);
    assert_non_null(job);
    job_ref(job);
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_true(ev_wait_suffix("BLOCK_JOB_COMPLETED,concluded,null,"));
    job_unref(job);
    assert_null(env.target->backing);
    assert_int_equal(vd_flush(env.target), 0);
    assert_image_reads(env.tgt, env.model);
    mirror_env_teardown(&env);
}

static void test_mirror_refuses_bad_options(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, true);
    VdError *err = NULL;
    MirrorOptions o = {.job_id = "m5", .source = env.source, .target = env.source->backing};
    assert_null(mirror_start(&o, &err)); /* target inside the source's chain */
    vd_error_free(err);
    err = NULL;
    o.target = env.target;
    o.granularity = 3000;
    assert_null(mirror_start(&o, &err));
    assert_string_equal(vd_error_msg(err), "Granularity must be a power of 2 between 512 and 64M");
    vd_error_free(err);
    err = NULL;
    o.granularity = 0;
    o.job_id = "";
    assert_null(mirror_start(&o, &err));
    assert_string_equal(vd_error_msg(err), "Invalid job ID ''");
    vd_error_free(err);
    assert_null(env.target->backing); /* nothing left changed */
    mirror_env_teardown(&env);
}

/* A memory target whose writes fail on demand (on-target-error). */
typedef struct MemDisk {
    uint8_t *data;
    volatile int fail;          /* -errno to return from writes, 0 = succeed */
    volatile unsigned delay_us; /* reads of more than 1 MiB (the copy's) return this late */
    pthread_mutex_t lock;       /* reads and writes are atomic, like a driver's metadata lock */
} MemDisk;

static int mem_pread(BlockNode *bs, uint64_t off, uint64_t n, void *buf)
{
    MemDisk *d = bs->opaque;
    vd_mutex_lock(&d->lock);
    memcpy(buf, d->data + off, n);
    vd_mutex_unlock(&d->lock);
    if (d->delay_us && n >= (1u << 20)) {
        usleep(d->delay_us); /* the data is read: now it can go stale */
    }
    return 0;
}

static int mem_pwrite(BlockNode *bs, uint64_t off, uint64_t n, const void *buf, int flags)
{
    MemDisk *d = bs->opaque;
    if (d->fail) {
        return d->fail;
    }
    vd_mutex_lock(&d->lock);
    memcpy(d->data + off, buf, n);
    vd_mutex_unlock(&d->lock);
    return 0;
}

static int64_t mem_getlength(BlockNode *bs)
{
    return MSIZE;
}

static void mem_close(BlockNode *bs)
{
    pthread_mutex_destroy(&((MemDisk *)bs->opaque)->lock);
    free(((MemDisk *)bs->opaque)->data);
}

static const BlockDriver mem_driver = {
    .name = "test-mem", .state_size = sizeof(MemDisk), .pread = mem_pread,
    .pwrite = mem_pwrite, .getlength = mem_getlength, .close = mem_close,
};

static BlockNode *mem_node(void)
{
    BlockNode *bs = calloc(1, sizeof(*bs));
    assert_non_null(bs);
    bs->drv = &mem_driver;
    bs->refcnt = 1;
    bs->open_flags = VD_OPEN_RDWR;
    bs->opaque = calloc(1, sizeof(MemDisk));
    ((MemDisk *)bs->opaque)->data = calloc(1, MSIZE);
    pthread_mutex_init(&((MemDisk *)bs->opaque)->lock, NULL);
    bs->filename = strdup("mem");
    bs->node_name = strdup("mem0");
    assert_int_equal(vd_write_hooks_init(bs), 0); /* as every node block.c makes */
    return bs;
}

/* Writers that overlap without pause: each write sits 1 ms in a hook, 4 threads in turn. */
typedef struct HookWriters {
    BlockNode *bs;
    int stop;       /* atomic */
    uint64_t done;  /* atomic: writes completed */
} HookWriters;

static void slow_before(void *opaque, const VdWriteReq *w)
{
    usleep(1000);
}

static void *hook_writer(void *opaque)
{
    HookWriters *hw = opaque;
    uint8_t buf[512] = {1};
    while (!__atomic_load_n(&hw->stop, __ATOMIC_SEQ_CST)) {
        assert_int_equal(vd_pwrite(hw->bs, 0, sizeof(buf), buf, 0), 0);
        __atomic_add_fetch(&hw->done, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

/*
 * A hook add/remove while guests write without pause returns while they still write: the list's
 * lock prefers its writer (with glibc's default, readers overlapping for ever starved it, and the
 * writers here stop only after the add and remove returned: the test would hang).
 */
static void test_write_hook_add_not_starved_by_writes(void **state)
{
    HookWriters hw = {.bs = mem_node()};
    VdWriteHook slow = {.before = slow_before, .opaque = &hw};
    assert_int_equal(vd_write_hook_add(hw.bs, &slow), 0);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_create(&t[i], NULL, hook_writer, &hw), 0);
    }
    while (__atomic_load_n(&hw.done, __ATOMIC_SEQ_CST) < 20) {
        usleep(1000); /* the writers are running */
    }
    int other;
    VdWriteHook h2 = {.opaque = &other};
    assert_int_equal(vd_write_hook_add(hw.bs, &h2), 0);
    vd_write_hook_remove(hw.bs, &other);
    uint64_t at = __atomic_load_n(&hw.done, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&hw.done, __ATOMIC_SEQ_CST) < at + 8) {
        usleep(1000); /* and still are */
    }
    __atomic_store_n(&hw.stop, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
    }
    vd_node_unref(hw.bs);
}

static Job *start_mem_mirror(MirrorEnv *env, BlockNode *mem, const char *id, JobErrorAction a)
{
    ev_reset();
    MirrorOptions o = {.job_id = id, .source = env->source, .target = mem, .base = NULL,
                       .target_new = true, .on_target_error = a, .auto_finalize = true,
                       .auto_dismiss = false};
    VdError *err = NULL;
    Job *job = mirror_start(&o, &err);
    if (!job) {
        fail_msg("mirror_start: %s", vd_error_msg(err));
    }
    job_ref(job);
    return job;
}

static void test_mirror_target_error_stop_then_resume(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, false);
    BlockNode *mem = mem_node();
    MemDisk *md = mem->opaque;
    md->fail = -ENOSPC;
    Job *job = start_mem_mirror(&env, mem, "m6", JOB_ERR_ENOSPC); /* ENOSPC -> stop */
    wait_status(job, JOB_STATUS_PAUSED);
    assert_true(ev_wait_suffix("BLOCK_JOB_ERROR,paused,"));
    json_t *q = job_query_block_info(job);
    assert_string_equal(json_string_value(json_object_get(q, "io-status")), "nospace");
    json_decref(q);
    md->fail = 0;
    VdError *err = NULL;
    assert_int_equal(job_user_resume(job, &err), 0);
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_true(ev_wait_suffix("BLOCK_JOB_COMPLETED,concluded,"));
    assert_int_equal(memcmp(md->data, env.model, MSIZE), 0);
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
    vd_node_unref(mem);
    mirror_env_teardown(&env);
}

static void test_mirror_target_error_report_fails_job(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, false);
    BlockNode *mem = mem_node();
    ((MemDisk *)mem->opaque)->fail = -EIO;
    Job *job = start_mem_mirror(&env, mem, "m7", JOB_ERR_ENOSPC); /* EIO -> report */
    job_wait_thread(job);
    assert_events("created,running,BLOCK_JOB_ERROR,aborting,BLOCK_JOB_COMPLETED,concluded,");
    assert_string_equal(json_string_value(json_object_get(ev_last_completed, "error")),
                        "Mirror write error: Input/output error");
    assert_null(mirror_filter_node(job));
    VdError *err = NULL;
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
    vd_node_unref(mem);
    mirror_env_teardown(&env);
}

static void test_mirror_pause_stops_copying(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, true);
    Job *job = start_mirror(&env, "m8", false, 1 << 20);
    VdError *err = NULL;
    assert_int_equal(job_user_pause(job, &err), 0);
    wait_status(job, JOB_STATUS_PAUSED);
    uint64_t c1, t1, c2, t2;
    job_progress_get(job, &c1, &t1);
    usleep(300000);
    job_progress_get(job, &c2, &t2);
    assert_int_equal(c1, c2);
    assert_true(c1 < t1);
    assert_int_equal(job_user_resume(job, &err), 0);
    assert_int_equal(job_set_speed(job, 0, &err), 0);
    wait_status(job, JOB_STATUS_READY);
    assert_int_equal(job_user_cancel(job, true, &err), 0); /* hard cancel after ready */
    job_wait_thread(job);
    assert_true(ev_wait_suffix("aborting,BLOCK_JOB_CANCELLED,concluded,"));
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
    mirror_env_teardown(&env);
}

static void test_mirror_switches_to_write_blocking_when_outpaced(void **state)
{
    MirrorEnv env;
    mirror_env_setup(&env, true);
    Job *job = start_mirror(&env, "m9", false, 128 << 10); /* 128 KiB/s: the guest is faster */
    Guest g;
    pthread_t th;
    run_guest_at(&g, &th, job, env.model, 17, 300, 200 * 1024); /* tens of MB/s */
    json_t *q = NULL;
    for (int i = 0; i < 80; i++) { /* up to 8 s */
        json_decref(q);
        q = job_query_block_info(job);
        if (json_is_true(json_object_get(q, "vdisk-auto-write-blocking"))) {
            break;
        }
        usleep(100000);
    }
    assert_string_equal(json_string_value(json_object_get(q, "vdisk-copy-mode")),
                        "write-blocking");
    assert_string_equal(json_string_value(json_object_get(q, "status")), "running");
    json_decref(q);
    VdError *err = NULL;
    assert_int_equal(job_set_speed(job, 0, &err), 0);
    wait_status(job, JOB_STATUS_READY);
    stop_guest(&g, th);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_true(ev_wait_suffix("BLOCK_JOB_COMPLETED,concluded,"));
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);
    assert_int_equal(vd_flush(env.target), 0);
    assert_image_reads(env.tgt, env.model);
    mirror_env_teardown(&env);
}

/*
 * The races below: two memory nodes, the source filled with (i * mul + add) and each of its reads
 * slowed by delay_us so copies stay in flight; returns the model (what the guest sees), a copy.
 */
static uint8_t *race_setup(BlockNode **src, BlockNode **dst, unsigned mul, unsigned add,
                           int delay_us)
{
    *src = mem_node();
    *dst = mem_node();
    MemDisk *sd = (*src)->opaque;
    for (uint32_t i = 0; i < MSIZE; i++) {
        sd->data[i] = (uint8_t)(i * mul + add);
    }
    uint8_t *model = malloc(MSIZE);
    memcpy(model, sd->data, MSIZE);
    sd->delay_us = delay_us;
    ev_reset();
    return model;
}

/* A race test's mirror (65536-byte granularity, a new target), started and referenced. */
static Job *race_mirror_start(const char *id, BlockNode *src, BlockNode *dst, bool write_blocking)
{
    MirrorOptions o = {.job_id = id, .source = src, .target = dst, .target_new = true,
                       .write_blocking = write_blocking, .granularity = 65536,
                       .auto_finalize = true, .auto_dismiss = true};
    VdError *err = NULL;
    Job *job = mirror_start(&o, &err);
    assert_non_null(job);
    job_ref(job);
    return job;
}

/* Complete the mirror (guests stopped): source and target both hold exactly the model. */
static void race_finish(Job *job, BlockNode *src, BlockNode *dst, uint8_t *model)
{
    VdError *err = NULL;
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    job_unref(job);
    assert_int_equal(memcmp(((MemDisk *)src->opaque)->data, model, MSIZE), 0);
    const uint8_t *t = ((MemDisk *)dst->opaque)->data;
    for (uint32_t i = 0; i < MSIZE; i++) {
        if (t[i] != model[i]) {
            fail_msg("target byte %u is 0x%02x, the guest wrote 0x%02x", i, t[i], model[i]);
        }
    }
    free(model);
    vd_node_unref(src);
    vd_node_unref(dst);
}

/*
 * The copy's read of the source is slow (50 ms) while a write-blocking guest hammers the same
 * range: unless copies and guest writes are serialised, the copy would write the old data it read
 * over the guest's newer data in the target (write-blocking writes leave nothing dirty to redo).
 */
static void test_mirror_copy_never_overwrites_newer_guest_data(void **state)
{
    BlockNode *src, *dst;
    uint8_t *model = race_setup(&src, &dst, 7, 1, 50000);
    Job *job = race_mirror_start("m10", src, dst, true);
    Guest g;
    pthread_t th;
    run_guest_at(&g, &th, job, model, 23, 200, 64 * 1024);
    wait_status(job, JOB_STATUS_READY);
    /* Enough guest writes raced with the (slow) copies: wait for them, not for a time. */
    assert_true(wait_guest_ops(&g, 21));
    stop_guest(&g, th);
    race_finish(job, src, dst, model);
}

/* ---- copy engine ---- */

typedef struct EngProbe {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t start[16], end[16];
    unsigned nactive, max_active, hold_until; /* a copy waits until hold_until are active */
    int overlaps, calls;
} EngProbe;

#define PROBE_ALIGN 65536ULL

static void probe_fn(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size)
{
    EngProbe *p = opaque;
    uint64_t s = c->off & ~(PROBE_ALIGN - 1);
    uint64_t e = (c->off + c->bytes + PROBE_ALIGN - 1) & ~(PROBE_ALIGN - 1);
    vd_mutex_lock(&p->lock);
    unsigned slot = 0;
    for (unsigned i = 0; i < 16; i++) {
        if (p->end[i] == 0) {
            slot = i;
            continue;
        }
        p->overlaps += s < p->end[i] && p->start[i] < e; /* sharing an aligned block */
    }
    for (unsigned i = 0; i < 16; i++) {
        if (p->end[i] == 0) {
            slot = i;
            break;
        }
    }
    p->start[slot] = s;
    p->end[slot] = e;
    p->nactive++;
    p->calls++;
    p->max_active = p->nactive > p->max_active ? p->nactive : p->max_active;
    memset(buf, 0xab, c->bytes < buf_size ? c->bytes : buf_size); /* the worker's own buffer */
    vd_cond_broadcast(&p->cond);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10; /* a safety net only: the wait ends when the others arrive */
    while (p->nactive < p->hold_until) {
        if (vd_cond_timedwait(&p->cond, &p->lock, &ts) != 0) {
            break;
        }
    }
    p->nactive--;
    p->start[slot] = p->end[slot] = 0;
    vd_mutex_unlock(&p->lock);
    c->copied = c->bytes;
    c->ret = c->off == 3 * PROBE_ALIGN ? -EIO : 0;
    c->is_read = true;
}

/* A copy that waits until the test opens its gate (by offset / PROBE_ALIGN). */
typedef struct Gate {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    unsigned open;   /* bit i: the chunk at i * PROBE_ALIGN may finish */
    unsigned started;
} Gate;

static void gate_fn(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size)
{
    (void)buf;
    (void)buf_size;
    Gate *g = opaque;
    unsigned bit = 1u << (c->off / PROBE_ALIGN);
    vd_mutex_lock(&g->lock);
    g->started |= bit;
    vd_cond_broadcast(&g->cond);
    while (!(g->open & bit)) {
        vd_cond_wait(&g->cond, &g->lock);
    }
    vd_mutex_unlock(&g->lock);
    c->ret = 0;
    c->copied = c->bytes;
}

/*
 * The sweep's progress mark (a commit journal clears what lies below it) never passes a chunk
 * whose copy has not finished: a submitted chunk waiting in a worker (or its pacing) counts.
 * A resumed commit once skipped such a range for good (review of b62caa6).
 */
static void test_copy_engine_low_water_holds_at_unfinished_copies(void **state)
{
    (void)state;
    Gate g = {0};
    pthread_mutex_init(&g.lock, NULL);
    pthread_cond_init(&g.cond, NULL);
    CopyEngineOptions o = {.workers = 2, .buf_size = 1 << 20, .align = PROBE_ALIGN,
                           .fn = gate_fn, .opaque = &g};
    CopyEngine *e = copy_engine_new(&o);
    assert_non_null(e);
    assert_int_equal(copy_engine_low_water(e, 8 * PROBE_ALIGN), 8 * PROBE_ALIGN);
    copy_engine_submit(e, 2 * PROBE_ALIGN, PROBE_ALIGN, false);
    copy_engine_submit(e, 5 * PROBE_ALIGN, PROBE_ALIGN, false);
    /* Queued or running, neither finished: the mark stays at the first. */
    assert_int_equal(copy_engine_low_water(e, 8 * PROBE_ALIGN), 2 * PROBE_ALIGN);
    assert_int_equal(copy_engine_low_water(e, PROBE_ALIGN), PROBE_ALIGN);
    vd_mutex_lock(&g.lock);
    while (g.started != ((1u << 2) | (1u << 5))) {
        vd_cond_wait(&g.cond, &g.lock);
    }
    g.open |= 1u << 2;
    vd_cond_broadcast(&g.cond);
    vd_mutex_unlock(&g.lock);
    CopyChunk c;
    assert_true(copy_engine_reap(e, &c, true));
    assert_int_equal(c.off, 2 * PROBE_ALIGN);
    assert_int_equal(copy_engine_low_water(e, 8 * PROBE_ALIGN), 5 * PROBE_ALIGN);
    vd_mutex_lock(&g.lock);
    g.open |= 1u << 5;
    vd_cond_broadcast(&g.cond);
    vd_mutex_unlock(&g.lock);
    assert_true(copy_engine_reap(e, &c, true));
    assert_int_equal(copy_engine_low_water(e, 8 * PROBE_ALIGN), 8 * PROBE_ALIGN);
    copy_engine_free(e);
    pthread_cond_destroy(&g.cond);
    pthread_mutex_destroy(&g.lock);
}

/*
 * The engine runs its workers' copies concurrently (all 4 are in flight at once), never two whose
 * ranges share an aligned block (clip), reports each result once, and drains before free.
 */
static void test_copy_engine_concurrency_and_no_overlap(void **state)
{
    EngProbe p = {.hold_until = 4};
    pthread_mutex_init(&p.lock, NULL);
    pthread_cond_init(&p.cond, NULL);
    CopyEngineOptions o = {.workers = 4, .buf_size = 1 << 20, .align = PROBE_ALIGN,
                           .fn = probe_fn, .opaque = &p};
    CopyEngine *e = copy_engine_new(&o);
    assert_non_null(e);
    assert_int_equal(copy_engine_max_in_flight(e), 4);
    /* Four disjoint chunks: each worker holds its copy until all four are running. */
    for (unsigned i = 0; i < 4; i++) {
        assert_int_equal(copy_engine_clip(e, i * 4 * PROBE_ALIGN, (i * 4 + 2) * PROBE_ALIGN, NULL),
                         (i * 4 + 2) * PROBE_ALIGN);
        copy_engine_submit(e, i * 4 * PROBE_ALIGN, 2 * PROBE_ALIGN, false);
    }
    assert_int_equal(copy_engine_in_flight(e), 4);
    /* An overlapping range is refused (or clipped) while those are in flight. */
    uint64_t skip = 0;
    assert_int_equal(copy_engine_clip(e, PROBE_ALIGN + 100, 3 * PROBE_ALIGN, &skip), 0);
    assert_int_equal(skip, 2 * PROBE_ALIGN);
    assert_int_equal(copy_engine_clip(e, 2 * PROBE_ALIGN + 1, 5 * PROBE_ALIGN, NULL),
                     4 * PROBE_ALIGN);
    CopyChunk c;
    for (unsigned i = 0; i < 4; i++) {
        assert_true(copy_engine_reap(e, &c, true));
        assert_int_equal(c.ret, 0);
        assert_int_equal(c.copied, 2 * PROBE_ALIGN);
    }
    assert_false(copy_engine_reap(e, &c, true)); /* nothing in flight: no wait */
    assert_int_equal(p.max_active, 4);

    /* Random, mostly overlapping candidates through clip: no two in flight ever overlap. */
    vd_mutex_lock(&p.lock);
    p.hold_until = 0;
    vd_mutex_unlock(&p.lock);
    unsigned seed = 99, submitted = 4, reaped = 4, failures = 0;
    for (int i = 0; i < 2000; i++) {
        uint64_t off = (uint64_t)(rand_r(&seed) % 64) * 16384;
        uint64_t end = off + 1 + (uint64_t)(rand_r(&seed) % (4 * PROBE_ALIGN));
        uint64_t clipped = copy_engine_clip(e, off, end, NULL);
        if (clipped && copy_engine_in_flight(e) < 4) {
            copy_engine_submit(e, off, clipped - off, false);
            submitted++;
        } else if (copy_engine_reap(e, &c, true)) {
            reaped++;
            failures += c.ret < 0;
        }
    }
    while (copy_engine_reap(e, &c, true)) {
        reaped++;
        failures += c.ret < 0;
    }
    assert_int_equal(submitted, reaped);
    assert_int_equal(p.calls, (int)submitted);
    assert_int_equal(p.overlaps, 0);
    (void)failures;
    /* A kick interrupts a waiting reap once and is seen once. */
    copy_engine_kick(e);
    assert_true(copy_engine_take_kick(e));
    assert_false(copy_engine_take_kick(e));
    copy_engine_free(e);
    pthread_mutex_destroy(&p.lock);
    pthread_cond_destroy(&p.cond);
}

static void copy_all_fn(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size)
{
    (void)opaque;
    (void)buf;
    (void)buf_size;
    c->ret = 0;
    c->copied = c->bytes;
}

/*
 * The early writeback never flushes: a destination whose file cannot start a writeback without a
 * sync (null-co here, blkdebug, ...) gets none, not the fdatasync every 8 MiB it once got (a
 * blkdebug flush rule consumed by it, its error lost). A local file gets one every 8 MiB.
 */
static void test_copy_engine_early_writeback_never_flushes(void **state)
{
    (void)state;
    VdError *err = NULL;
    BlockNode *dst = vd_open_json("json:{\"driver\": \"raw\", \"file\": {\"driver\": "
                                  "\"null-co\", \"size\": 67108864}}",
                                  NULL, VD_OPEN_RDWR, &err);
    assert_null(err);
    assert_non_null(dst);
    uint64_t every = 1;
    assert_null(copy_engine_writeback_node(dst, &every));
    assert_int_equal(every, 0);
    /* Even when handed one, the engine only starts writebacks: 32 MiB copied, no flush. */
    CopyEngineOptions o = {.workers = 2, .buf_size = 1 << 20, .align = PROBE_ALIGN,
                           .fn = copy_all_fn, .writeback = dst->file,
                           .writeback_every = 1 << 20};
    CopyEngine *e = copy_engine_new(&o);
    assert_non_null(e);
    uint64_t before = vd_flush_requests(dst->file);
    for (uint64_t off = 0; off < (32u << 20); off += 1u << 20) {
        copy_engine_submit(e, off, 1u << 20, false);
        CopyChunk c;
        assert_true(copy_engine_reap(e, &c, true));
        assert_int_equal(c.ret, 0);
    }
    copy_engine_free(e);
    assert_int_equal(vd_flush_requests(dst->file) - before, 0);
    vd_node_unref(dst);

    char path[] = "/tmp/vdisk-test-wb-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    BlockNode *f = vd_open_image(path, "raw", VD_OPEN_RDWR, &err);
    assert_null(err);
    assert_non_null(f);
    assert_ptr_equal(copy_engine_writeback_node(f, &every), f->file);
    assert_int_equal(every, 8u << 20);
    vd_node_unref(f);
    unlink(path);
}

/* ---- guest priority: the copy budget (docs/guest-priority.md) ---- */

static CopyWindow busy_window(uint64_t mean_ns)
{
    return (CopyWindow){.guest_done = 100, .guest_lat_ns = 100 * mean_ns, .guest_in_flight = 8};
}

/*
 * A guest whose latency rises (the copy is hurting it) shrinks the copy's share window by window
 * down to the floor and never below: the copy gets one request in flight and a finite pause, so it
 * always progresses. A guest stalled for a whole window counts as hurt too.
 */
static void test_copy_budget_shrinks_under_a_busy_guest_but_never_to_zero(void **state)
{
    CopyBudget b;
    copy_budget_init(&b, 0.10);
    CopyWindow w = busy_window(100000); /* 100 us: the guest's unhurt latency */
    copy_budget_update(&b, &w);
    assert_true(b.guest_active);
    assert_int_equal(copy_budget_allowed(&b, 4), 1);
    double s0 = b.share;
    assert_true(s0 > 0.10);
    w = busy_window(500000); /* 5x: hurt */
    copy_budget_update(&b, &w);
    assert_true(b.share < s0);
    double prev = b.share;
    for (int i = 0; i < 100; i++) {
        copy_budget_update(&b, &w);
        assert_true(b.share <= prev);
        assert_true(b.share >= 0.10);
        prev = b.share;
    }
    assert_true(b.share < 0.11); /* reached the floor */
    assert_int_equal(copy_budget_allowed(&b, 4), 1);
    /* At the floor a 1 ms copy is followed by ~9 ms of pause: finite, and not zero. */
    uint64_t gap = copy_budget_gap_ns(&b, 1000000);
    assert_true(gap >= 8000000 && gap <= 10000000);
    /* Stalled: requests in flight, none finished in the window. Still the floor, not zero. */
    CopyWindow stalled = {.guest_done = 0, .guest_lat_ns = 0, .guest_in_flight = 3};
    for (int i = 0; i < 10; i++) {
        copy_budget_update(&b, &stalled);
    }
    assert_true(b.guest_active);
    assert_true(b.share >= 0.10);
    assert_int_equal(copy_budget_allowed(&b, 4), 1);
    /* A floor of 0 is refused: the copy must converge. */
    copy_budget_init(&b, 0);
    assert_true(b.floor > 0);
    for (int i = 0; i < 100; i++) {
        copy_budget_update(&b, &stalled);
    }
    assert_true(b.share > 0);
    assert_true(copy_budget_gap_ns(&b, 1000000) < 2000000000ULL);
}

/*
 * An idle guest leaves the whole engine to the copy (all workers, no pause), and a guest whose
 * latency stays near its low-water mark lets the share grow back to a copy running all the time.
 */
static void test_copy_budget_idle_guest_gets_everything_and_share_recovers(void **state)
{
    CopyBudget b;
    copy_budget_init(&b, 0.10);
    CopyWindow idle = {0};
    copy_budget_update(&b, &idle);
    assert_false(b.guest_active);
    assert_int_equal(copy_budget_allowed(&b, 4), 4);
    assert_int_equal(copy_budget_gap_ns(&b, 5000000), 0);
    CopyWindow hurt = busy_window(100000);
    copy_budget_update(&b, &hurt); /* learns the low-water mark */
    hurt = busy_window(400000);
    for (int i = 0; i < 20; i++) {
        copy_budget_update(&b, &hurt);
    }
    double low = b.share;
    assert_true(low < 0.2);
    CopyWindow fine = busy_window(110000);
    for (int i = 0; i < 40; i++) {
        copy_budget_update(&b, &fine);
    }
    assert_true(b.share > low);
    assert_true(b.share >= 1.0);
    assert_int_equal(copy_budget_gap_ns(&b, 5000000), 0);
    /* An unhurt busy guest lets the copy grow past one request in flight, up to the workers. */
    assert_true(copy_budget_allowed(&b, 4) >= 2);
    for (int i = 0; i < 200; i++) {
        copy_budget_update(&b, &fine);
    }
    assert_int_equal(copy_budget_allowed(&b, 4), 4);
    /* Hurt again: back to one paced copy within a few windows. */
    for (int i = 0; i < 8; i++) {
        copy_budget_update(&b, &hurt);
    }
    assert_int_equal(copy_budget_allowed(&b, 4), 1);
    assert_true(copy_budget_gap_ns(&b, 5000000) > 0);
    /* The guest stops: everything for the copy again. */
    copy_budget_update(&b, &idle);
    assert_int_equal(copy_budget_allowed(&b, 4), 4);
}

static void noop_fn(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size)
{
    c->copied = c->bytes;
    c->ret = 0;
}

/*
 * The convergence floor: while the guest takes back more than half of what the job copies (the
 * dirty set shrank by less than half the bytes copied in a progress window), the floor doubles
 * window by window up to every worker in flight with no pause, whatever the guest's latency says;
 * it holds while the job gains, and falls back to the configured floor once the dirty set is small.
 */
static void test_copy_budget_floor_rises_until_the_copy_gains_on_the_guest(void **state)
{
    const uint64_t M = 1 << 20;
    CopyBudget b;
    copy_budget_init(&b, 0.10);
    CopyWindow calm = busy_window(100000), hurt = busy_window(500000);
    copy_budget_update(&b, &calm);
    for (int i = 0; i < 20; i++) {
        copy_budget_update(&b, &hurt);
    }
    assert_true(b.share < 0.11);
    /* Copied 8 MiB, the set shrank by 1 MiB only: losing, the floor doubles. */
    copy_budget_progress(&b, 40 * M, 39 * M, 8 * M, 4);
    assert_true(b.floor > 0.19 && b.floor < 0.21);
    assert_true(b.share >= b.floor);
    for (int i = 0; i < 20; i++) {
        copy_budget_update(&b, &hurt); /* a hurt guest cannot take it below the raised floor */
    }
    assert_true(b.share >= 0.19);
    uint64_t gap_before = copy_budget_gap_ns(&b, 1000000);
    assert_true(gap_before < 5000000); /* ~4 ms after a 1 ms copy, not ~9 ms */
    /* Gaining at least half of what it copies: the floor holds. */
    copy_budget_progress(&b, 39 * M, 34 * M, 8 * M, 4);
    assert_true(b.floor > 0.19 && b.floor < 0.21);
    /* No copy ended in the window: losing only if the set grew. */
    copy_budget_progress(&b, 34 * M, 34 * M, 0, 4);
    assert_true(b.floor < 0.21);
    copy_budget_progress(&b, 34 * M, 36 * M, 0, 4);
    assert_true(b.floor > 0.39 && b.floor < 0.41);
    /* Still losing: up to all four workers, no pause, under a hurt guest. */
    for (int i = 0; i < 10; i++) {
        copy_budget_progress(&b, 36 * M, 36 * M, 16 * M, 4);
        copy_budget_update(&b, &hurt);
    }
    assert_true(b.floor <= 4.0 && b.floor > 3.99);
    assert_int_equal(copy_budget_allowed(&b, 4), 4);
    assert_int_equal(copy_budget_gap_ns(&b, 1000000), 0);
    assert_true(b.raised >= 6);
    /* Caught up (at most COPY_CONVERGED_BYTES dirty): the guest gets its priority back. */
    copy_budget_progress(&b, 36 * M, COPY_CONVERGED_BYTES, 40 * M, 4);
    assert_true(b.floor < 0.11);
    for (int i = 0; i < 20; i++) {
        copy_budget_update(&b, &hurt);
    }
    assert_int_equal(copy_budget_allowed(&b, 4), 1);
    assert_true(copy_budget_gap_ns(&b, 1000000) >= 8000000);
}

/*
 * Keeping up: once the dirty set was small (caught up, as while READY), a set above
 * COPY_KEEPUP_BYTES is copied with no pause whatever the guest's latency says, so a complete finds
 * about that much to copy; before it was ever small (the first pass), the guest keeps its priority.
 */
static void test_copy_budget_keeps_up_once_caught_up(void **state)
{
    const uint64_t M = 1 << 20;
    CopyBudget b;
    copy_budget_init(&b, 0.10);
    CopyWindow calm = busy_window(100000), hurt = busy_window(500000);
    copy_budget_update(&b, &calm);
    for (int i = 0; i < 20; i++) {
        copy_budget_update(&b, &hurt);
    }
    assert_true(b.share < 0.11);
    /* The first pass: much dirty, never caught up: paced at the share. */
    copy_budget_dirty(&b, 400 * M);
    assert_false(b.behind);
    assert_true(copy_budget_gap_ns(&b, 1000000) >= 8000000);
    /* Caught up: at most COPY_KEEPUP_BYTES dirty is left to the paced copy. */
    copy_budget_dirty(&b, COPY_CONVERGED_BYTES);
    assert_true(b.caught_up);
    assert_true(b.behind); /* 4 MiB > COPY_KEEPUP_BYTES: copy it now */
    assert_int_equal(copy_budget_gap_ns(&b, 1000000), 0);
    copy_budget_dirty(&b, COPY_KEEPUP_BYTES);
    assert_false(b.behind);
    assert_true(copy_budget_gap_ns(&b, 1000000) >= 8000000);
    /* The guest dirties more: no pause until the set is that small again. */
    copy_budget_dirty(&b, COPY_KEEPUP_BYTES + 64 * 1024);
    assert_true(b.behind);
    assert_int_equal(copy_budget_gap_ns(&b, 1000000), 0);
    assert_int_equal(copy_budget_allowed(&b, 4), 1); /* one copy: more is the floor's to give */
    copy_budget_dirty(&b, 0);
    assert_false(b.behind);
    /* An idle guest still gets no pause and every worker. */
    copy_budget_update(&b, &(CopyWindow){0});
    assert_int_equal(copy_budget_gap_ns(&b, 1000000), 0);
    assert_int_equal(copy_budget_allowed(&b, 4), 4);
}

/*
 * A job's own requests (block_tracker_begin_job) are ordered like any other on the tracker but
 * are not in its stats: the budget reads the guest from them without subtracting the copies
 * afterwards (which raced with a copy ending and once drove the latency low-water mark to ~0).
 */
static void test_tracker_stats_leave_out_the_jobs_own_requests(void **state)
{
    BlockNode *n = mem_node();
    BlockTracker *t = block_tracker_get(n);
    assert_non_null(t);
    uint64_t ended0, lat0, ended, lat;
    unsigned in_flight;
    block_tracker_stats(t, &ended0, &lat0, &in_flight);
    assert_int_equal(in_flight, 0);
    BtRequest job, guest;
    block_tracker_begin_job(t, &job, 0, 65536, BT_SHARED);
    block_tracker_begin(t, &guest, 1 << 20, 4096, BT_EXCLUSIVE);
    assert_int_equal(block_tracker_in_flight(t), 2);
    block_tracker_stats(t, &ended, &lat, &in_flight);
    assert_int_equal(in_flight, 1);
    usleep(2000);
    block_tracker_end(t, &job);
    block_tracker_stats(t, &ended, &lat, &in_flight);
    assert_int_equal(ended, ended0);
    assert_int_equal(lat, lat0);
    assert_int_equal(in_flight, 1);
    block_tracker_end(t, &guest);
    block_tracker_stats(t, &ended, &lat, &in_flight);
    assert_int_equal(ended, ended0 + 1);
    assert_true(lat >= lat0 + 2000000); /* the guest's request spanned the 2 ms */
    assert_int_equal(in_flight, 0);
    block_tracker_put(t);
    vd_node_unref(n);
}

/*
 * The engine reads the guest's activity from its tracker: while a guest request is in flight,
 * one copy at a time; once the guest is gone (after a window), all workers. Its own tracked copies
 * on the same tracker are not mistaken for the guest's. A kick ends a pacing wait, so a drain
 * never waits for the pacing.
 */
static void test_copy_engine_yields_to_guest_requests_on_its_tracker(void **state)
{
    BlockNode *n = mem_node();
    BlockTracker *t = block_tracker_get(n);
    assert_non_null(t);
    CopyEngineOptions o = {.workers = 4, .buf_size = 65536, .align = 65536, .tracker = t,
                           .kind = BT_SHARED, .fn = noop_fn};
    CopyEngine *e = copy_engine_new(&o);
    assert_non_null(e);
    BtRequest guest;
    block_tracker_begin(t, &guest, 1 << 20, 4096, BT_EXCLUSIVE);
    unsigned allowed = 4;
    for (int i = 0; i < 200 && allowed != 1; i++) { /* within a window or two */
        usleep(5000);
        allowed = copy_engine_allowed(e);
    }
    assert_int_equal(allowed, 1);
    /* Our own copies while the guest is busy: they run (paced), and are reaped. */
    CopyChunk c;
    for (unsigned i = 0; i < 3; i++) {
        copy_engine_submit(e, i * 65536, 65536, true);
        copy_engine_kick(e); /* no waiting for the pacing */
        assert_true(copy_engine_reap(e, &c, true) || copy_engine_reap(e, &c, true));
        assert_int_equal(c.ret, 0);
    }
    block_tracker_end(t, &guest);
    for (int i = 0; i < 200 && allowed != 4; i++) {
        usleep(5000);
        allowed = copy_engine_allowed(e);
    }
    assert_int_equal(allowed, 4);
    /* Only our copies on the tracker now: still "guest idle", all workers. */
    for (unsigned i = 0; i < 4; i++) {
        copy_engine_submit(e, (8 + i) * 65536, 65536, true);
    }
    usleep(30000);
    assert_int_equal(copy_engine_allowed(e), 4);
    copy_engine_drain(e, NULL, NULL);
    copy_engine_free(e);
    block_tracker_put(t);
    vd_node_unref(n);
}

/*
 * Several copies in flight (unthrottled: the 4 MiB disk is four 1 MiB copies at once, re-copies of
 * dirtied ranges after) while two background-mode guests hammer the disk through the filter: the
 * target must end up with
 * exactly what the guests wrote last (a copy of old data landing after a newer guest write, or two
 * copies of one range reordered, would show). The source's 1 MiB+ reads are slowed down, so copies
 * stay in flight long enough to race.
 */
static void test_mirror_parallel_copies_never_overwrite_newer_guest_data(void **state)
{
    BlockNode *src, *dst;
    uint8_t *model = race_setup(&src, &dst, 13, 5, 20000);
    /*
     * All workers in flight while the guests write: guest priority would hold the copy to one
     * paced request and this test is about many racing them.
     */
    setenv("VDISK_COPY_GUEST_PRIORITY", "0", 1);
    Job *job = race_mirror_start("m11", src, dst, false);
    unsetenv("VDISK_COPY_GUEST_PRIORITY"); /* read when the engine was created */
    Guest g, g2;
    pthread_t th, th2;
    run_guest_at(&g, &th, job, model, 31, 200, 64 * 1024);
    run_guest_at(&g2, &th2, job, model, 32, 200, 256 * 1024);
    wait_status(job, JOB_STATUS_READY);
    assert_true(wait_guest_ops(&g, 30) && wait_guest_ops(&g2, 30));
    stop_guest(&g, th);
    stop_guest(&g2, th2);
    race_finish(job, src, dst, model);
}

int main(void)
{
    job_set_event_sink(sink);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_transition_table),
        cmocka_unit_test(test_verb_table),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_id_wellformed),
        cmocka_unit_test(test_error_action_parse),
        cmocka_unit_test(test_ratelimit),
        cmocka_unit_test(test_ready_complete_auto),
        cmocka_unit_test(test_ready_sets_offset_to_len),
        cmocka_unit_test(test_no_ready_after_hard_cancel),
        cmocka_unit_test(test_completion_runs_on_qmp_thread),
        cmocka_unit_test(test_verbs_refused_with_qemu_messages),
        cmocka_unit_test(test_pause_resume_running_and_ready),
        cmocka_unit_test(test_manual_finalize),
        cmocka_unit_test(test_cancel_pending),
        cmocka_unit_test(test_failure_and_prepare_failure),
        cmocka_unit_test(test_error_stop_pauses_until_resume),
        cmocka_unit_test(test_cancel_all_sync_for_shutdown),
        cmocka_unit_test(test_mirror_pivot_background),
        cmocka_unit_test(test_mirror_pivot_write_blocking),
        cmocka_unit_test(test_mirror_cancel_before_ready_leaves_source),
        cmocka_unit_test(test_mirror_soft_cancel_after_ready_is_point_in_time),
        cmocka_unit_test(test_mirror_full_sync_no_backing),
        cmocka_unit_test(test_mirror_refuses_bad_options),
        cmocka_unit_test(test_mirror_target_error_stop_then_resume),
        cmocka_unit_test(test_mirror_target_error_report_fails_job),
        cmocka_unit_test(test_mirror_pause_stops_copying),
        cmocka_unit_test(test_write_hook_add_not_starved_by_writes),
        cmocka_unit_test(test_mirror_switches_to_write_blocking_when_outpaced),
        cmocka_unit_test(test_mirror_copy_never_overwrites_newer_guest_data),
        cmocka_unit_test(test_copy_engine_concurrency_and_no_overlap),
        cmocka_unit_test(test_copy_engine_low_water_holds_at_unfinished_copies),
        cmocka_unit_test(test_copy_engine_early_writeback_never_flushes),
        cmocka_unit_test(test_copy_budget_shrinks_under_a_busy_guest_but_never_to_zero),
        cmocka_unit_test(test_copy_budget_idle_guest_gets_everything_and_share_recovers),
        cmocka_unit_test(test_copy_budget_floor_rises_until_the_copy_gains_on_the_guest),
        cmocka_unit_test(test_copy_budget_keeps_up_once_caught_up),
        cmocka_unit_test(test_tracker_stats_leave_out_the_jobs_own_requests),
        cmocka_unit_test(test_copy_engine_yields_to_guest_requests_on_its_tracker),
        cmocka_unit_test(test_mirror_parallel_copies_never_overwrite_newer_guest_data),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
