/*
 * qmp-commands-jobs.c - QMP commands of background jobs: query-jobs, query-block-jobs and the job-*
 * and block-job-* verbs. Their argument tables and QEMU's error messages live here; the semantics
 * live in src/jobs/job.c. Handlers run on the QMP thread (one at a time), after the server checked
 * the arguments against the tables (so the members below are present and of the right type).
 */
#include <errno.h>
#include <string.h>

#include "jobs/job.h"
#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"

static const QmpArgSpec id_args[] = {{"id", QA_STR, true}, {NULL}};
static const QmpArgSpec device_args[] = {{"device", QA_STR, true}, {NULL}};
static const QmpArgSpec set_speed_args[] = {{"device", QA_STR, true}, {"speed", QA_INT, true},
                                            {NULL}};
static const QmpArgSpec cancel_args[] = {{"device", QA_STR, true}, {"force", QA_BOOL}, {NULL}};

/*
 * block-job-* name the job by "device" (its id) and report a missing one as QEMU's DeviceNotActive
 * "Block job '%s' not found": ENODEV (the QMP server maps it; GenericError otherwise).
 */
static Job *find_block_job(json_t *args, const char *key, VdError **errp)
{
    const char *id = json_string_value(json_object_get(args, key));
    Job *job = job_find(id);
    if (!job) {
        vd_error_setg(errp, ENODEV, "Block job '%s' not found", id ? id : "");
    }
    return job;
}

/* job-* report a missing job as a GenericError "Job not found". */
static Job *find_job(json_t *args, VdError **errp)
{
    Job *job = job_find(json_string_value(json_object_get(args, "id")));
    if (!job) {
        vd_error_setg(errp, ESRCH, "Job not found");
    }
    return job;
}

/* The reply of a verb; drops the reference job_find gave. */
static json_t *verb_done(Job *job, int r)
{
    job_unref(job);
    return r < 0 ? NULL : json_object();
}

/* ---- queries ---- */

static void add_info(Job *job, void *opaque)
{
    json_array_append_new(opaque, job_query_info(job));
}

static void add_block_info(Job *job, void *opaque)
{
    json_array_append_new(opaque, job_query_block_info(job));
}

static json_t *qmp_query_jobs(json_t *args, VdError **errp)
{
    json_t *arr = json_array();
    job_foreach(add_info, arr);
    return arr;
}

static json_t *qmp_query_block_jobs(json_t *args, VdError **errp)
{
    json_t *arr = json_array();
    job_foreach(add_block_info, arr);
    return arr;
}

/* ---- block-job-* ---- */

static json_t *qmp_block_job_set_speed(json_t *args, VdError **errp)
{
    int64_t speed = json_integer_value(json_object_get(args, "speed"));
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_set_speed(job, speed, errp)) : NULL;
}

static json_t *qmp_block_job_pause(json_t *args, VdError **errp)
{
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_pause(job, errp)) : NULL;
}

static json_t *qmp_block_job_resume(json_t *args, VdError **errp)
{
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_resume(job, errp)) : NULL;
}

static json_t *qmp_block_job_cancel(json_t *args, VdError **errp)
{
    bool force = qmp_arg_bool(args, "force", false);
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_cancel(job, force, errp)) : NULL;
}

static json_t *qmp_block_job_complete(json_t *args, VdError **errp)
{
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_complete(job, errp)) : NULL;
}

static json_t *qmp_block_job_finalize(json_t *args, VdError **errp)
{
    Job *job = find_block_job(args, "id", errp);
    return job ? verb_done(job, job_user_finalize(job, errp)) : NULL;
}

static json_t *qmp_block_job_dismiss(json_t *args, VdError **errp)
{
    Job *job = find_block_job(args, "id", errp);
    return job ? verb_done(job, job_user_dismiss(job, errp)) : NULL;
}

/* ---- job-* ---- */

static json_t *qmp_job_pause(json_t *args, VdError **errp)
{
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_pause(job, errp)) : NULL;
}

static json_t *qmp_job_resume(json_t *args, VdError **errp)
{
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_resume(job, errp)) : NULL;
}

static json_t *qmp_job_cancel(json_t *args, VdError **errp)
{
    Job *job = find_job(args, errp);
    /* job-cancel is always a hard cancel (QEMU: force = true). */
    return job ? verb_done(job, job_user_cancel(job, true, errp)) : NULL;
}

static json_t *qmp_job_complete(json_t *args, VdError **errp)
{
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_complete(job, errp)) : NULL;
}

static json_t *qmp_job_finalize(json_t *args, VdError **errp)
{
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_finalize(job, errp)) : NULL;
}

static json_t *qmp_job_dismiss(json_t *args, VdError **errp)
{
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_dismiss(job, errp)) : NULL;
}

void qmp_commands_jobs_register(void)
{
    /* The QMP server hosts the jobs: their events go to its clients, their ends run on its thread. */
    job_set_host(qmp_event_emit, qmp_defer);
    static const struct {
        const char *name;
        const QmpArgSpec *args;
        QmpCommandFn fn;
    } cmds[] = {
        {"query-jobs", qmp_no_args, qmp_query_jobs},
        {"query-block-jobs", qmp_no_args, qmp_query_block_jobs},
        {"block-job-set-speed", set_speed_args, qmp_block_job_set_speed},
        {"block-job-pause", device_args, qmp_block_job_pause},
        {"block-job-resume", device_args, qmp_block_job_resume},
        {"block-job-cancel", cancel_args, qmp_block_job_cancel},
        {"block-job-complete", device_args, qmp_block_job_complete},
        {"block-job-finalize", id_args, qmp_block_job_finalize},
        {"block-job-dismiss", id_args, qmp_block_job_dismiss},
        {"job-pause", id_args, qmp_job_pause},
        {"job-resume", id_args, qmp_job_resume},
        {"job-cancel", id_args, qmp_job_cancel},
        {"job-complete", id_args, qmp_job_complete},
        {"job-finalize", id_args, qmp_job_finalize},
        {"job-dismiss", id_args, qmp_job_dismiss},
    };
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        qmp_register_command(cmds[i].name, cmds[i].args, cmds[i].fn);
    }
}
