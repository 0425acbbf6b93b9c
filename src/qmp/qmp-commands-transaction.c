/*
 * qmp-commands-transaction.c - QMP transaction: several actions, all or nothing, as QEMU's.
 * Every action's arguments are type-checked first; then each action is prepared in order (all
 * its checks, and only what can be undone: an overlay created and opened, a bitmap added or
 * cleared with its bits kept); if one prepare fails, the prepared ones are aborted in reverse
 * order and its error is the reply; else all are committed in order (the snapshot switches).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"

/* QEMU 7.2's TransactionActionKind. */
static const char *const action_types[] = {
    "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync", "drive-backup", NULL};
static const char *const completion_modes[] = {"individual", "grouped", NULL};

static const QmpArgSpec properties_spec[] = {
    {"completion-mode", QA_ENUM, false, completion_modes},
    {NULL}};
static const QmpArgSpec transaction_args[] = {
    {"actions", QA_ARRAY, true},
    {"properties", QA_OBJ, .nested = properties_spec},
    {NULL}};
static const QmpArgSpec action_spec[] = {
    {"type", QA_ENUM, true, action_types},
    {"data", QA_OBJ, true},
    {NULL}};

/* The actions vdiskd can do in a transaction: "data"'s table and the prepare step. */
typedef struct ActionKind {
    const char *type;
    const QmpArgSpec *data;
    QmpActionPrepare *prepare; /* NULL: abort, whose prepare always fails */
} ActionKind;

static const QmpArgSpec no_members[] = {{NULL}};
static const ActionKind kinds[] = {
    {"abort", no_members, NULL},
    {"block-dirty-bitmap-add", qmp_bitmap_add_args, qmp_action_bitmap_add},
    {"block-dirty-bitmap-clear", qmp_bitmap_args, qmp_action_bitmap_clear},
    {"blockdev-snapshot", qmp_snapshot_args, qmp_action_snapshot},
    {"blockdev-snapshot-sync", qmp_snapshot_sync_args, qmp_action_snapshot_sync},
    {NULL, NULL, NULL}};

static const ActionKind *kind_of(json_t *action)
{
    const char *t = json_string_value(json_object_get(action, "type"));
    for (const ActionKind *k = kinds; k->type; k++) {
        if (!strcmp(k->type, t)) {
            return k;
        }
    }
    return NULL;
}

/* Pass 1, as QEMU's visitor: every action's type and data members, before anything runs. */
static int check_actions(json_t *actions, VdError **errp)
{
    size_t i;
    json_t *act;
    json_array_foreach(actions, i, act) {
        char prefix[64];
        snprintf(prefix, sizeof(prefix), "actions[%zu].", i);
        if (qmp_args_check1(act, prefix, action_spec, errp) < 0) {
            return -EINVAL;
        }
        const ActionKind *k = kind_of(act);
        if (!k) {
            vd_error_setg(errp, ENOTSUP, "Transaction action '%s' is not supported by vdiskd "
                          "(supported: abort, block-dirty-bitmap-add, block-dirty-bitmap-clear, "
                          "blockdev-snapshot, blockdev-snapshot-sync)",
                          json_string_value(json_object_get(act, "type")));
            return -ENOTSUP;
        }
        snprintf(prefix, sizeof(prefix), "actions[%zu].data.", i);
        if (qmp_args_check1(json_object_get(act, "data"), prefix, k->data, errp) < 0) {
            return -EINVAL;
        }
    }
    return 0;
}

static json_t *cmd_transaction(json_t *args, VdError **errp)
{
    json_t *actions = json_object_get(args, "actions");
    json_t *props = json_object_get(args, "properties");
    const char *mode = props ? qmp_arg_str(props, "completion-mode", "individual") : "individual";
    if (check_actions(actions, errp) < 0) {
        return NULL;
    }
    size_t n = json_array_size(actions), done = 0;
    QmpAction *prepared = calloc(n ? n : 1, sizeof(*prepared));
    if (!prepared) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    int r = 0;
    for (; done < n && r == 0; done++) {
        json_t *act = json_array_get(actions, done);
        const ActionKind *k = kind_of(act);
        if (!k->prepare) {
            vd_error_setg(errp, ECANCELED, "Transaction aborted using Abort action");
            r = -ECANCELED;
        } else if (strcmp(mode, "individual") != 0) {
            /* only backup jobs can complete as a group (QEMU's text) */
            vd_error_setg(errp, EINVAL, "Action '%s' does not support Transaction property "
                          "completion-mode = %s", k->type, mode);
            r = -EINVAL;
        } else {
            r = k->prepare(json_object_get(act, "data"), &prepared[done], errp);
        }
    }
    if (r < 0) {
        done--; /* the one that failed prepared nothing */
        while (done-- > 0) {
            prepared[done].abort(prepared[done].state);
        }
        free(prepared);
        qmp_error_not_device(errp);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        prepared[i].commit(prepared[i].state);
    }
    free(prepared);
    return json_object();
}

void qmp_commands_transaction_register(void)
{
    qmp_register_command("transaction", transaction_args, cmd_transaction);
}
