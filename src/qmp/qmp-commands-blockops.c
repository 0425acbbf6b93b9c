/*
 * qmp-commands-blockops.c - QMP commands that start a copy or reshape a live chain: drive-mirror,
 * blockdev-mirror, block-stream, block-commit, blockdev-snapshot-sync and blockdev-snapshot. Each
 * command is one argument table in QEMU 7.2's QAPI member order (so the first bad member is the
 * one QEMU names) that fills the typed request of src/jobs/; the semantics live there. Handlers
 * run on the QMP thread, one at a time, after the server checked the arguments against the table.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/backup.h"
#include "jobs/blockops.h"
#include "jobs/mirror.h"
#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"
#include "util/log.h"

/* BlockdevOnError, listed in JobErrorAction's order so the index is the action; then "auto". */
static const char *const on_error_values[] = {"report", "ignore", "stop", "enospc", "auto", NULL};
#define ON_ERROR_AUTO 4
/* MirrorSyncMode, in MirrorSync's order. */
static const char *const sync_values[] = {"top", "full", "none", "incremental", "bitmap", NULL};
/* NewImageMode: index 0 is "existing" (a bool in the requests). */
static const char *const image_mode_values[] = {"existing", "absolute-paths", NULL};
/* MirrorCopyMode: index 1 is "write-blocking" (a bool in MirrorRequest). */
static const char *const copy_mode_values[] = {"background", "write-blocking", NULL};

/* As QEMU's block_job_error_action: "auto" acts as "enospc" for a job. */
static int job_error_action(int on_error)
{
    return on_error == ON_ERROR_AUTO ? JOB_ERR_ENOSPC : on_error;
}

/* The index of "existing" in image_mode_values is 0: true means mode=existing. */
static bool is_existing(int mode)
{
    return mode == 0;
}

/* mode=absolute-paths given explicitly (MODE_OMITTED otherwise): absolute backing names; without
 * it vdiskd records them relative (QEMU's default is absolute-paths; docs/blockops.md). */
#define MODE_OMITTED (-1)
static bool is_absolute(int mode)
{
    return mode == 1;
}

/* ---- drive-mirror / blockdev-mirror ---- */

/* MirrorRequest plus the members whose QAPI enum becomes a bool there. */
typedef struct MirrorArgs {
    MirrorRequest r;
    int mode, copy_mode;
} MirrorArgs;

#define M(field) QMP_AT(MirrorArgs, r.field)
static const QmpArgSpec drive_mirror_args[] = {
    {"job-id", QA_STR, .at = M(job_id)},
    {"device", QA_STR, true, .at = M(device)},
    {"target", QA_STR, true, .at = M(target)},
    {"format", QA_STR, .at = M(format)},
    {"node-name", QA_STR, .at = M(node_name)},
    {"replaces", QA_STR, .has_at = M(has_replaces)},
    {"sync", QA_ENUM, true, sync_values, .at = M(sync)},
    {"mode", QA_ENUM, false, image_mode_values, .at = QMP_AT(MirrorArgs, mode)},
    {"speed", QA_INT, .at = M(speed)},
    {"granularity", QA_U32, .at = M(granularity)},
    {"buf-size", QA_INT, .at = M(buf_size)},
    {"on-source-error", QA_ENUM, false, on_error_values, .at = M(on_source_error)},
    {"on-target-error", QA_ENUM, false, on_error_values, .at = M(on_target_error)},
    {"unmap", QA_BOOL, .at = M(unmap)},
    {"copy-mode", QA_ENUM, false, copy_mode_values, .at = QMP_AT(MirrorArgs, copy_mode)},
    {"auto-finalize", QA_BOOL, .at = M(auto_finalize)},
    {"auto-dismiss", QA_BOOL, .at = M(auto_dismiss)},
    {"base-node", QA_STR, .at = M(base_node)}, /* vdisk's extensions */
    {"x-backing-matches", QA_BOOL, .at = M(backing_matches)},
    {"x-verify", QA_BOOL, .at = M(verify)},
    {NULL}};

static const QmpArgSpec blockdev_mirror_args[] = {
    {"job-id", QA_STR, .at = M(job_id)},
    {"device", QA_STR, true, .at = M(device)},
    {"target", QA_STR, true, .at = M(target)},
    {"replaces", QA_STR, .has_at = M(has_replaces)},
    {"sync", QA_ENUM, true, sync_values, .at = M(sync)},
    {"speed", QA_INT, .at = M(speed)},
    {"granularity", QA_U32, .at = M(granularity)},
    {"buf-size", QA_INT, .at = M(buf_size)},
    {"on-source-error", QA_ENUM, false, on_error_values, .at = M(on_source_error)},
    {"on-target-error", QA_ENUM, false, on_error_values, .at = M(on_target_error)},
    {"filter-node-name", QA_STR, .at = M(filter_node_name)},
    {"copy-mode", QA_ENUM, false, copy_mode_values, .at = QMP_AT(MirrorArgs, copy_mode)},
    {"auto-finalize", QA_BOOL, .at = M(auto_finalize)},
    {"auto-dismiss", QA_BOOL, .at = M(auto_dismiss)},
    {"base-node", QA_STR, .at = M(base_node)}, /* vdisk's extensions */
    {"x-backing-matches", QA_BOOL, .at = M(backing_matches)},
    {"x-verify", QA_BOOL, .at = M(verify)},
    {NULL}};
#undef M

static json_t *mirror(json_t *args, const QmpArgSpec *spec, bool blockdev, VdError **errp)
{
    MirrorArgs a = {.r = {.blockdev = blockdev, .unmap = true, .auto_finalize = true,
                          .auto_dismiss = true},
                    .mode = MODE_OMITTED};
    if (qmp_args_parse(args, spec, &a, errp) < 0) {
        return NULL;
    }
    a.r.mode_existing = is_existing(a.mode);
    a.r.mode_absolute = is_absolute(a.mode);
    a.r.write_blocking = a.copy_mode == 1;
    a.r.on_source_error = job_error_action(a.r.on_source_error);
    a.r.on_target_error = job_error_action(a.r.on_target_error);
    return mirror_request_start(&a.r, errp) < 0 ? NULL : json_object();
}

static json_t *cmd_drive_mirror(json_t *args, VdError **errp)
{
    return mirror(args, drive_mirror_args, false, errp);
}

static json_t *cmd_blockdev_mirror(json_t *args, VdError **errp)
{
    return mirror(args, blockdev_mirror_args, true, errp);
}

/* ---- block-stream / block-commit ---- */

#define S(field) QMP_AT(StreamRequest, field)
static const QmpArgSpec block_stream_args[] = {
    {"job-id", QA_STR, .at = S(job_id)},
    {"device", QA_STR, true, .at = S(device)},
    {"base", QA_STR, .at = S(base)},
    {"base-node", QA_STR, .at = S(base_node)},
    {"backing-file", QA_STR, .at = S(backing_file)},
    {"bottom", QA_STR, .at = S(bottom)},
    {"speed", QA_INT, .at = S(speed)},
    {"on-error", QA_ENUM, false, on_error_values, .at = S(on_error)},
    {"filter-node-name", QA_STR, .has_at = S(has_filter_node_name)},
    {"auto-finalize", QA_BOOL, .at = S(auto_finalize)},
    {"auto-dismiss", QA_BOOL, .at = S(auto_dismiss)},
    {NULL}};
#undef S

#define C(field) QMP_AT(CommitRequest, field)
static const QmpArgSpec block_commit_args[] = {
    {"job-id", QA_STR, .at = C(job_id)},
    {"device", QA_STR, true, .at = C(device)},
    {"base-node", QA_STR, .at = C(base_node)},
    {"base", QA_STR, .at = C(base)},
    {"top-node", QA_STR, .at = C(top_node)},
    {"top", QA_STR, .at = C(top)},
    {"backing-file", QA_STR, .at = C(backing_file)},
    {"speed", QA_INT, .at = C(speed)},
    {"on-error", QA_ENUM, false, on_error_values, .at = C(on_error)},
    {"filter-node-name", QA_STR, .has_at = C(has_filter_node_name)},
    {"auto-finalize", QA_BOOL, .at = C(auto_finalize)},
    {"auto-dismiss", QA_BOOL, .at = C(auto_dismiss)},
    {NULL}};
#undef C

static json_t *cmd_block_stream(json_t *args, VdError **errp)
{
    StreamRequest r = {.auto_finalize = true, .auto_dismiss = true};
    if (qmp_args_parse(args, block_stream_args, &r, errp) < 0) {
        return NULL;
    }
    r.on_error = job_error_action(r.on_error);
    return stream_request_start(&r, errp) < 0 ? NULL : json_object();
}

static json_t *cmd_block_commit(json_t *args, VdError **errp)
{
    CommitRequest r = {.auto_finalize = true, .auto_dismiss = true};
    if (qmp_args_parse(args, block_commit_args, &r, errp) < 0) {
        return NULL;
    }
    r.on_error = job_error_action(r.on_error);
    return commit_request_start(&r, errp) < 0 ? NULL : json_object();
}

/* ---- blockdev-backup ---- */

/* BitmapSyncMode, in BackupBitmapMode's order. */
static const char *const bitmap_mode_values[] = {"on-success", "never", "always", NULL};

/* BackupPerf (x-perf): checked, ignored. */
static const QmpArgSpec backup_perf_args[] = {
    {"use-copy-range", QA_BOOL},
    {"max-workers", QA_INT},
    {"max-chunk", QA_INT},
    {NULL}};

#define K(field) QMP_AT(BackupRequest, field)
static const QmpArgSpec blockdev_backup_args[] = {
    {"job-id", QA_STR, .at = K(job_id)},
    {"device", QA_STR, true, .at = K(device)},
    {"sync", QA_ENUM, true, sync_values, .at = K(sync)},
    {"speed", QA_INT, .at = K(speed)},
    {"bitmap", QA_STR, .at = K(bitmap)},
    {"bitmap-mode", QA_ENUM, false, bitmap_mode_values, .at = K(bitmap_mode),
     .has_at = K(has_bitmap_mode)},
    {"compress", QA_BOOL, .at = K(compress)},
    {"on-source-error", QA_ENUM, false, on_error_values, .at = K(on_source_error)},
    {"on-target-error", QA_ENUM, false, on_error_values, .at = K(on_target_error)},
    {"auto-finalize", QA_BOOL, .at = K(auto_finalize)},
    {"auto-dismiss", QA_BOOL, .at = K(auto_dismiss)},
    {"filter-node-name", QA_STR, .at = K(filter_node_name)},
    {"x-perf", QA_OBJ, .nested = backup_perf_args, .has_at = K(has_x_perf)},
    {"target", QA_STR, true, .at = K(target)},
    {NULL}};
#undef K

static json_t *cmd_blockdev_backup(json_t *args, VdError **errp)
{
    BackupRequest r = {.auto_finalize = true, .auto_dismiss = true};
    if (qmp_args_parse(args, blockdev_backup_args, &r, errp) < 0) {
        return NULL;
    }
    r.on_source_error = job_error_action(r.on_source_error);
    r.on_target_error = job_error_action(r.on_target_error);
    if (backup_request_start(&r, errp) < 0) {
        qmp_error_not_device(errp); /* QEMU's backup errors are all GenericError */
        return NULL;
    }
    return json_object();
}

/* ---- snapshots ---- */

typedef struct SnapshotSyncArgs {
    SnapshotSyncRequest r;
    int mode;
} SnapshotSyncArgs;

#define X(field) QMP_AT(SnapshotSyncArgs, r.field)
const QmpArgSpec qmp_snapshot_sync_args[] = {
    {"device", QA_STR, .at = X(device)},
    {"node-name", QA_STR, .at = X(node_name)},
    {"snapshot-file", QA_STR, true, .at = X(snapshot_file)},
    {"snapshot-node-name", QA_STR, .at = X(snapshot_node_name)},
    {"format", QA_STR, .at = X(format)},
    {"mode", QA_ENUM, false, image_mode_values, .at = QMP_AT(SnapshotSyncArgs, mode)},
    {NULL}};
#undef X

typedef struct SnapshotArgs {
    const char *node, *overlay;
} SnapshotArgs;

const QmpArgSpec qmp_snapshot_args[] = {
    {"node", QA_STR, true, .at = QMP_AT(SnapshotArgs, node)},
    {"overlay", QA_STR, true, .at = QMP_AT(SnapshotArgs, overlay)},
    {NULL}};

static int parse_snapshot_sync(json_t *args, SnapshotSyncRequest *r, VdError **errp)
{
    SnapshotSyncArgs a = {.mode = MODE_OMITTED};
    if (qmp_args_parse(args, qmp_snapshot_sync_args, &a, errp) < 0) {
        return -EINVAL;
    }
    *r = a.r;
    r->mode_existing = is_existing(a.mode);
    r->mode_absolute = is_absolute(a.mode);
    return 0;
}

static json_t *cmd_blockdev_snapshot_sync(json_t *args, VdError **errp)
{
    SnapshotSyncRequest r;
    if (parse_snapshot_sync(args, &r, errp) < 0) {
        return NULL;
    }
    return snapshot_sync(&r, errp) < 0 ? NULL : json_object();
}

static json_t *cmd_blockdev_snapshot(json_t *args, VdError **errp)
{
    SnapshotArgs a = {0};
    if (qmp_args_parse(args, qmp_snapshot_args, &a, errp) < 0) {
        return NULL;
    }
    return snapshot_blockdev(a.node, a.overlay, errp) < 0 ? NULL : json_object();
}

/* transaction actions: prepare opens (sync) and checks; the switch is the commit */
static void snapshot_action_commit(void *state)
{
    VdError *err = NULL;
    if (snapshot_commit(state, &err) < 0) {
        vd_log(VD_LOG_ERROR, "transaction: snapshot switch failed: %s", vd_error_msg(err));
        vd_error_free(err);
    }
    free(state);
}

static void snapshot_action_abort(void *state)
{
    snapshot_abort(state);
    free(state);
}

static int snapshot_action(json_t *data, bool sync, QmpAction *act, VdError **errp)
{
    SnapshotPrepared *p = calloc(1, sizeof(*p));
    SnapshotSyncRequest r;
    SnapshotArgs a = {0};
    int ret = p ? 0 : -ENOMEM;
    if (!p) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    } else if (sync) {
        ret = parse_snapshot_sync(data, &r, errp);
        ret = ret < 0 ? ret : snapshot_sync_prepare(&r, p, errp);
    } else {
        ret = qmp_args_parse(data, qmp_snapshot_args, &a, errp);
        ret = ret < 0 ? ret : snapshot_blockdev_prepare(a.node, a.overlay, p, errp);
    }
    if (ret < 0) {
        free(p);
        return ret;
    }
    *act = (QmpAction){.state = p, .commit = snapshot_action_commit,
                       .abort = snapshot_action_abort};
    return 0;
}

int qmp_action_snapshot_sync(json_t *data, QmpAction *act, VdError **errp)
{
    return snapshot_action(data, true, act, errp);
}

int qmp_action_snapshot(json_t *data, QmpAction *act, VdError **errp)
{
    return snapshot_action(data, false, act, errp);
}

/* ---- block-job-change (QEMU 8.2) ---- */

/* JobType; only the mirror branch has members (copy-mode). */
static const char *const job_type_values[] = {"commit", "stream", "mirror", "backup", "create",
                                              "amend", "snapshot-load", "snapshot-save",
                                              "snapshot-delete", NULL};
#define JOB_TYPE_MIRROR 2

typedef struct JobChangeArgs {
    const char *id;
    int type, copy_mode;
    bool has_copy_mode;
} JobChangeArgs;

static const QmpArgSpec block_job_change_args[] = {
    {"id", QA_STR, true, .at = QMP_AT(JobChangeArgs, id)},
    {"type", QA_ENUM, true, job_type_values, .at = QMP_AT(JobChangeArgs, type)},
    {"copy-mode", QA_ENUM, false, copy_mode_values, .at = QMP_AT(JobChangeArgs, copy_mode),
     .has_at = QMP_AT(JobChangeArgs, has_copy_mode)},
    {NULL}};

static json_t *cmd_block_job_change(json_t *args, VdError **errp)
{
    JobChangeArgs a = {0};
    if (qmp_args_parse(args, block_job_change_args, &a, errp) < 0) {
        return NULL;
    }
    /* The union's branch: copy-mode belongs to (and is required by) type mirror only. */
    if (a.type == JOB_TYPE_MIRROR && !a.has_copy_mode) {
        vd_error_setg(errp, EINVAL, "Parameter 'copy-mode' is missing");
        return NULL;
    }
    if (a.type != JOB_TYPE_MIRROR && a.has_copy_mode) {
        vd_error_setg(errp, EINVAL, "Parameter 'copy-mode' is unexpected");
        return NULL;
    }
    Job *job = job_find(a.id);
    if (!job) {
        vd_error_setg(errp, ENODEV, "Block job '%s' not found", a.id);
        return NULL;
    }
    int r = 0;
    if (strcmp(job_type(job), job_type_values[a.type]) != 0) {
        vd_error_setg(errp, EINVAL, "Job type %s doesn't match requested type %s",
                      job_type(job), job_type_values[a.type]);
        r = -EINVAL;
    } else if (a.type == JOB_TYPE_MIRROR) {
        r = mirror_change_copy_mode(job, a.copy_mode == 1, errp);
    }
    job_unref(job);
    return r < 0 ? NULL : json_object();
}

void qmp_commands_blockops_register(void)
{
    qmp_register_command("block-job-change", block_job_change_args, cmd_block_job_change);
    qmp_register_command("drive-mirror", drive_mirror_args, cmd_drive_mirror);
    qmp_register_command("blockdev-mirror", blockdev_mirror_args, cmd_blockdev_mirror);
    qmp_register_command("block-stream", block_stream_args, cmd_block_stream);
    qmp_register_command("blockdev-backup", blockdev_backup_args, cmd_blockdev_backup);
    qmp_register_command("block-commit", block_commit_args, cmd_block_commit);
    qmp_register_command("blockdev-snapshot-sync", qmp_snapshot_sync_args,
                         cmd_blockdev_snapshot_sync);
    qmp_register_command("blockdev-snapshot", qmp_snapshot_args, cmd_blockdev_snapshot);
}
