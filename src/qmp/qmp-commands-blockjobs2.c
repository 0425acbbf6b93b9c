/*
 * qmp-commands-blockjobs2.c - QMP commands that reshape a live chain: block-stream, block-commit,
 * blockdev-snapshot-sync and blockdev-snapshot. Arguments are checked here against QEMU 7.2's QAPI
 * schema (same member order, same error texts); the semantics live in src/jobs/{stream,commit,
 * snapshot}.c. Handlers run on the QMP thread, one at a time.
 */
#include "jobs/blockops.h"
#include "qmp/qmp-args.h"
#include "qmp/qmp.h"

static const char *const on_error_values[] = {"report", "ignore", "enospc", "stop", "auto", NULL};
static const char *const snapshot_mode_values[] = {"existing", "absolute-paths", NULL};

static const QmpArgSpec stream_spec[] = {
    {"job-id", QA_STR},
    {"device", QA_STR, true},
    {"base", QA_STR},
    {"base-node", QA_STR},
    {"backing-file", QA_STR},
    {"bottom", QA_STR},
    {"speed", QA_INT},
    {"on-error", QA_ENUM, false, on_error_values},
    {"filter-node-name", QA_STR},
    {"auto-finalize", QA_BOOL},
    {"auto-dismiss", QA_BOOL},
    {NULL},
};

static const QmpArgSpec commit_spec[] = {
    {"job-id", QA_STR},
    {"device", QA_STR, true},
    {"base-node", QA_STR},
    {"base", QA_STR},
    {"top-node", QA_STR},
    {"top", QA_STR},
    {"backing-file", QA_STR},
    {"speed", QA_INT},
    {"on-error", QA_ENUM, false, on_error_values},
    {"filter-node-name", QA_STR},
    {"auto-finalize", QA_BOOL},
    {"auto-dismiss", QA_BOOL},
    {NULL},
};

static const QmpArgSpec snapshot_sync_spec[] = {
    {"device", QA_STR},
    {"node-name", QA_STR},
    {"snapshot-file", QA_STR, true},
    {"snapshot-node-name", QA_STR},
    {"format", QA_STR},
    {"mode", QA_ENUM, false, snapshot_mode_values},
    {NULL},
};

static const QmpArgSpec snapshot_spec[] = {
    {"node", QA_STR, true},
    {"overlay", QA_STR, true},
    {NULL},
};

static json_t *qmp_block_stream(json_t *args, VdError **errp)
{
    if (qmp_args_check1(args, "", stream_spec, errp) < 0) {
        return NULL;
    }
    return stream_qmp_start(args, errp);
}

static json_t *qmp_block_commit(json_t *args, VdError **errp)
{
    if (qmp_args_check1(args, "", commit_spec, errp) < 0) {
        return NULL;
    }
    return commit_qmp_start(args, errp);
}

static json_t *qmp_blockdev_snapshot_sync(json_t *args, VdError **errp)
{
    if (qmp_args_check1(args, "", snapshot_sync_spec, errp) < 0) {
        return NULL;
    }
    return snapshot_qmp_sync(args, errp);
}

static json_t *qmp_blockdev_snapshot(json_t *args, VdError **errp)
{
    if (qmp_args_check1(args, "", snapshot_spec, errp) < 0) {
        return NULL;
    }
    return snapshot_qmp_blockdev(args, errp);
}

void blockops_qmp_register(void)
{
    qmp_register_command("block-stream", qmp_block_stream);
    qmp_register_command("block-commit", qmp_block_commit);
    qmp_register_command("blockdev-snapshot-sync", qmp_blockdev_snapshot_sync);
    qmp_register_command("blockdev-snapshot", qmp_blockdev_snapshot);
}
