/*
 * qmp-commands-jobs.c - QMP commands of background jobs: query-jobs, query-block-jobs, the job-* and
 * block-job-* verbs, drive-mirror and blockdev-mirror. Argument checking and QEMU's error messages
 * live here; the semantics live in src/jobs/. Handlers run on the QMP thread (one at a time).
 */
#include <errno.h>
#include <string.h>

#include "jobs/job.h"
#include "jobs/mirror.h"
#include "qmp/qmp.h"

/* Refuse unknown arguments and missing required ones, as QEMU's generated marshallers do. */
static int check_args(json_t *args, const char *const *required, const char *const *optional,
                      VdError **errp)
{
    const char *key;
    json_t *val;
    json_object_foreach(args, key, val) {
        bool ok = false;
        for (const char *const *k = required; *k && !ok; k++) {
            ok = !strcmp(*k, key);
        }
        for (const char *const *k = optional; *k && !ok; k++) {
            ok = !strcmp(*k, key);
        }
        if (!ok) {
            vd_error_setg(errp, EINVAL, "Parameter '%s' is unexpected", key);
            return -EINVAL;
        }
    }
    for (const char *const *k = required; *k; k++) {
        if (!json_object_get(args, *k)) {
            vd_error_setg(errp, EINVAL, "Parameter '%s' is missing", *k);
            return -EINVAL;
        }
        if (!json_is_string(json_object_get(args, *k))) {
            vd_error_setg(errp, EINVAL, "Invalid parameter type for '%s', expected: string", *k);
            return -EINVAL;
        }
    }
    return 0;
}

static const char *const no_opts[] = {NULL};
static const char *const req_id[] = {"id", NULL};
static const char *const req_device[] = {"device", NULL};

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
    if (check_args(args, no_opts, no_opts, errp) < 0) {
        return NULL;
    }
    json_t *arr = json_array();
    job_foreach(add_info, arr);
    return arr;
}

static json_t *qmp_query_block_jobs(json_t *args, VdError **errp)
{
    if (check_args(args, no_opts, no_opts, errp) < 0) {
        return NULL;
    }
    json_t *arr = json_array();
    job_foreach(add_block_info, arr);
    return arr;
}

/* ---- block-job-* ---- */

static json_t *qmp_block_job_set_speed(json_t *args, VdError **errp)
{
    /* speed is an integer, not a string: listed as optional, then checked by hand. */
    static const char *const opt[] = {"speed", NULL};
    if (check_args(args, req_device, opt, errp) < 0) {
        return NULL;
    }
    json_t *speed = json_object_get(args, "speed");
    if (!speed) {
        vd_error_setg(errp, EINVAL, "Parameter 'speed' is missing");
        return NULL;
    }
    if (!json_is_integer(speed)) {
        vd_error_setg(errp, EINVAL, "Invalid parameter type for 'speed', expected: integer");
        return NULL;
    }
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_set_speed(job, json_integer_value(speed), errp)) : NULL;
}

static json_t *qmp_block_job_pause(json_t *args, VdError **errp)
{
    if (check_args(args, req_device, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_pause(job, errp)) : NULL;
}

static json_t *qmp_block_job_resume(json_t *args, VdError **errp)
{
    if (check_args(args, req_device, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_resume(job, errp)) : NULL;
}

static json_t *qmp_block_job_cancel(json_t *args, VdError **errp)
{
    static const char *const opt[] = {"force", NULL};
    if (check_args(args, req_device, opt, errp) < 0) {
        return NULL;
    }
    json_t *force = json_object_get(args, "force");
    if (force && !json_is_boolean(force)) {
        vd_error_setg(errp, EINVAL, "Invalid parameter type for 'force', expected: boolean");
        return NULL;
    }
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_cancel(job, json_is_true(force), errp)) : NULL;
}

static json_t *qmp_block_job_complete(json_t *args, VdError **errp)
{
    if (check_args(args, req_device, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_block_job(args, "device", errp);
    return job ? verb_done(job, job_user_complete(job, errp)) : NULL;
}

static json_t *qmp_block_job_finalize(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_block_job(args, "id", errp);
    return job ? verb_done(job, job_user_finalize(job, errp)) : NULL;
}

static json_t *qmp_block_job_dismiss(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_block_job(args, "id", errp);
    return job ? verb_done(job, job_user_dismiss(job, errp)) : NULL;
}

/* ---- job-* ---- */

static json_t *qmp_job_pause(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_pause(job, errp)) : NULL;
}

static json_t *qmp_job_resume(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_resume(job, errp)) : NULL;
}

static json_t *qmp_job_cancel(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_job(args, errp);
    /* job-cancel is always a hard cancel (QEMU: force = true). */
    return job ? verb_done(job, job_user_cancel(job, true, errp)) : NULL;
}

static json_t *qmp_job_complete(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_complete(job, errp)) : NULL;
}

static json_t *qmp_job_finalize(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_finalize(job, errp)) : NULL;
}

static json_t *qmp_job_dismiss(json_t *args, VdError **errp)
{
    if (check_args(args, req_id, no_opts, errp) < 0) {
        return NULL;
    }
    Job *job = find_job(args, errp);
    return job ? verb_done(job, job_user_dismiss(job, errp)) : NULL;
}

/* ---- mirror ---- */

static json_t *qmp_drive_mirror(json_t *args, VdError **errp)
{
    return mirror_qmp_start(args, false, errp);
}

static json_t *qmp_blockdev_mirror(json_t *args, VdError **errp)
{
    return mirror_qmp_start(args, true, errp);
}

void jobs_qmp_register(void)
{
    static const struct {
        const char *name;
        QmpCommandFn fn;
    } cmds[] = {
        {"query-jobs", qmp_query_jobs},
        {"query-block-jobs", qmp_query_block_jobs},
        {"block-job-set-speed", qmp_block_job_set_speed},
        {"block-job-pause", qmp_block_job_pause},
        {"block-job-resume", qmp_block_job_resume},
        {"block-job-cancel", qmp_block_job_cancel},
        {"block-job-complete", qmp_block_job_complete},
        {"block-job-finalize", qmp_block_job_finalize},
        {"block-job-dismiss", qmp_block_job_dismiss},
        {"job-pause", qmp_job_pause},
        {"job-resume", qmp_job_resume},
        {"job-cancel", qmp_job_cancel},
        {"job-complete", qmp_job_complete},
        {"job-finalize", qmp_job_finalize},
        {"job-dismiss", qmp_job_dismiss},
        {"drive-mirror", qmp_drive_mirror},
        {"blockdev-mirror", qmp_blockdev_mirror},
    };
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        qmp_register_command(cmds[i].name, cmds[i].fn);
    }
}
