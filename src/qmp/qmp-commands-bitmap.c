/*
 * qmp-commands-bitmap.c - block-dirty-bitmap-add/remove/clear/enable/disable/merge with
 * qemu-storage-daemon 7.2's arguments and error texts. The server checks the argument tables;
 * handlers parse them into typed structs (merge's source list is checked here, element by
 * element) and call block/dirty-bitmap.c. Runs on the QMP thread.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/dirty-bitmap.h"
#include "block/graph.h"
#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"

/* BlockDirtyBitmap: {node, name}, the arguments of remove/clear/enable/disable. */
typedef struct BitmapArgs {
    const char *node, *name;
} BitmapArgs;

const QmpArgSpec qmp_bitmap_args[] = {
    {"node", QA_STR, true, .at = QMP_AT(BitmapArgs, node)},
    {"name", QA_STR, true, .at = QMP_AT(BitmapArgs, name)},
    {NULL}};

typedef struct AddArgs {
    const char *node, *name;
    uint32_t granularity;
    bool has_granularity, persistent, disabled;
} AddArgs;

const QmpArgSpec qmp_bitmap_add_args[] = {
    {"node", QA_STR, true, .at = QMP_AT(AddArgs, node)},
    {"name", QA_STR, true, .at = QMP_AT(AddArgs, name)},
    {"granularity", QA_U32, .at = QMP_AT(AddArgs, granularity),
     .has_at = QMP_AT(AddArgs, has_granularity)},
    {"persistent", QA_BOOL, .at = QMP_AT(AddArgs, persistent)},
    {"disabled", QA_BOOL, .at = QMP_AT(AddArgs, disabled)},
    {NULL}};

typedef struct MergeArgs {
    const char *node, *target;
    json_t *bitmaps;
} MergeArgs;

static const QmpArgSpec merge_args[] = {
    {"node", QA_STR, true, .at = QMP_AT(MergeArgs, node)},
    {"target", QA_STR, true, .at = QMP_AT(MergeArgs, target)},
    {"bitmaps", QA_ARRAY, true, .at = QMP_AT(MergeArgs, bitmaps)},
    {NULL}};

/* QEMU words a missing node two ways: add looks it up as device or node, the rest as node. */
static BlockNode *find_node(const char *node, bool as_device, VdError **errp)
{
    BlockNode *bs = graph_find_node(node);
    if (!bs) {
        if (as_device) {
            vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", node,
                          node);
        } else {
            vd_error_setg(errp, EINVAL, "Node '%s' not found", node);
        }
    }
    return bs;
}

/* Handlers succeed with {} or fail with a GenericError (never DeviceNotFound, as QEMU). */
static json_t *reply(int ret, VdError **errp)
{
    if (ret < 0) {
        qmp_error_not_device(errp);
        return NULL;
    }
    return json_object();
}

/* block-dirty-bitmap-add; *added (may be NULL) = the node it was added to. 0 or -errno. */
static int bitmap_add(json_t *args, BlockNode **added, const char **name, VdError **errp)
{
    AddArgs a = {0};
    if (qmp_args_parse(args, qmp_bitmap_add_args, &a, errp) < 0) {
        return -EINVAL;
    }
    BlockNode *bs = find_node(a.node, true, errp);
    if (!bs) {
        return -EINVAL;
    }
    if (a.has_granularity && a.granularity == 0) {
        vd_error_setg(errp, EINVAL, "Granularity must be power of 2 and at least 512");
        return -EINVAL;
    }
    int r = vd_bitmap_add(bs, a.name, a.granularity, a.persistent, a.disabled, errp);
    if (r == 0 && added) {
        *added = bs;
        *name = a.name;
    }
    return r;
}

static json_t *cmd_add(json_t *args, VdError **errp)
{
    return reply(bitmap_add(args, NULL, NULL, errp), errp);
}

/* transaction actions: add (undone by removing it) and clear (undone by restoring the bits) */
typedef struct BitmapActionState {
    BlockNode *bs;
    char *name;
    VdBitmapSaved *saved; /* clear: the bits before */
} BitmapActionState;

static void bitmap_action_free(void *state)
{
    BitmapActionState *st = state;
    if (st->saved) {
        vd_bitmap_saved_free(st->saved);
    }
    free(st->name);
    free(st);
}

static void bitmap_add_abort(void *state)
{
    BitmapActionState *st = state;
    vd_bitmap_remove(st->bs, st->name, NULL);
    bitmap_action_free(st);
}

static void bitmap_clear_abort(void *state)
{
    BitmapActionState *st = state;
    vd_bitmap_restore(st->bs, st->name, st->saved);
    st->saved = NULL; /* restore took it */
    bitmap_action_free(st);
}

static int bitmap_action(BitmapActionState *st, QmpAction *act, void (*abort_fn)(void *),
                         VdError **errp)
{
    if (!st->name) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        abort_fn(st);
        return -ENOMEM;
    }
    *act = (QmpAction){.state = st, .commit = bitmap_action_free, .abort = abort_fn};
    return 0;
}

int qmp_action_bitmap_add(json_t *data, QmpAction *act, VdError **errp)
{
    BitmapActionState *st = calloc(1, sizeof(*st));
    const char *name = NULL;
    int r = st ? bitmap_add(data, &st->bs, &name, errp) : -ENOMEM;
    if (r < 0) {
        if (!st) {
            vd_error_setg(errp, ENOMEM, "Out of memory");
        }
        free(st);
        return r;
    }
    st->name = strdup(name);
    return bitmap_action(st, act, bitmap_add_abort, errp);
}

int qmp_action_bitmap_clear(json_t *data, QmpAction *act, VdError **errp)
{
    BitmapArgs a = {0};
    if (qmp_args_parse(data, qmp_bitmap_args, &a, errp) < 0) {
        return -EINVAL;
    }
    BlockNode *bs = find_node(a.node, false, errp);
    BitmapActionState *st = bs ? calloc(1, sizeof(*st)) : NULL;
    if (bs && !st) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    if (!st) {
        return bs ? -ENOMEM : -EINVAL;
    }
    st->bs = bs;
    if (vd_bitmap_check_clearable(bs, a.name, errp) < 0 ||
        !(st->saved = vd_bitmap_save_and_clear(bs, a.name, errp))) {
        free(st);
        return -EINVAL;
    }
    st->name = strdup(a.name);
    return bitmap_action(st, act, bitmap_clear_abort, errp);
}

typedef int BitmapCmd(BlockNode *bs, const char *name, VdError **errp);

/* The shape of remove/clear/enable/disable: {node, name}, node looked up, one operation. */
static json_t *bitmap_cmd(json_t *args, BitmapCmd *fn, VdError **errp)
{
    BitmapArgs a = {0};
    if (qmp_args_parse(args, qmp_bitmap_args, &a, errp) < 0) {
        return NULL;
    }
    BlockNode *bs = find_node(a.node, false, errp);
    if (!bs) {
        return NULL;
    }
    return reply(fn(bs, a.name, errp), errp);
}

static int do_enable(BlockNode *bs, const char *name, VdError **errp)
{
    return vd_bitmap_enable(bs, name, true, errp);
}

static int do_disable(BlockNode *bs, const char *name, VdError **errp)
{
    return vd_bitmap_enable(bs, name, false, errp);
}

static json_t *cmd_remove(json_t *args, VdError **errp)
{
    return bitmap_cmd(args, vd_bitmap_remove, errp);
}

static json_t *cmd_clear(json_t *args, VdError **errp)
{
    return bitmap_cmd(args, vd_bitmap_clear, errp);
}

static json_t *cmd_enable(json_t *args, VdError **errp)
{
    return bitmap_cmd(args, do_enable, errp);
}

static json_t *cmd_disable(json_t *args, VdError **errp)
{
    return bitmap_cmd(args, do_disable, errp);
}

int qmp_bitmap_refs_check(json_t *list, VdError **errp)
{
    size_t i;
    json_t *el;
    json_array_foreach(list, i, el) {
        if (json_is_string(el)) {
            continue;
        }
        if (!json_is_object(el)) {
            vd_error_setg(errp, EINVAL, "Invalid parameter type for 'null', expected: "
                          "BlockDirtyBitmapOrStr");
            return -EINVAL;
        }
        char prefix[48];
        snprintf(prefix, sizeof(prefix), "bitmaps[%zu].", i);
        if (qmp_args_check1(el, prefix, qmp_bitmap_args, errp) < 0) {
            return -EINVAL;
        }
    }
    return 0;
}

int qmp_bitmap_refs(json_t *list, BlockNode *bs, bool chain, VdBitmapRef *refs, VdError **errp)
{
    if (qmp_bitmap_refs_check(list, errp) < 0) {
        return -EINVAL;
    }
    size_t i;
    json_t *el;
    json_array_foreach(list, i, el) {
        if (json_is_string(el)) {
            refs[i].name = json_string_value(el);
            refs[i].node = chain ? vd_bitmap_find_in_chain(bs, refs[i].name) : bs;
            if (!refs[i].node) {
                vd_error_setg(errp, ENOENT, "Bitmap '%s' is not found", refs[i].name);
                return -ENOENT;
            }
            continue;
        }
        BitmapArgs a = {0};
        if (qmp_args_parse(el, qmp_bitmap_args, &a, errp) < 0) {
            return -EINVAL;
        }
        refs[i].node = find_node(a.node, false, errp);
        refs[i].name = a.name;
        if (!refs[i].node) {
            return -EINVAL;
        }
    }
    return 0;
}

static json_t *cmd_merge(json_t *args, VdError **errp)
{
    MergeArgs a = {0};
    if (qmp_args_parse(args, merge_args, &a, errp) < 0 ||
        qmp_bitmap_refs_check(a.bitmaps, errp) < 0) {
        return NULL;
    }
    size_t n = json_array_size(a.bitmaps);
    VdBitmapRef *refs = calloc(n ? n : 1, sizeof(*refs));
    if (!refs) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    /* QEMU looks the target up before the sources */
    BlockNode *bs = find_node(a.node, false, errp);
    int ret = bs ? vd_bitmap_check_exists(bs, a.target, errp) : -EINVAL;
    if (ret == 0) {
        ret = qmp_bitmap_refs(a.bitmaps, bs, false, refs, errp);
    }
    if (ret == 0) {
        ret = vd_bitmap_merge(bs, a.target, refs, n, errp);
    }
    free(refs);
    return reply(ret, errp);
}

void qmp_commands_bitmap_register(void)
{
    qmp_register_command("block-dirty-bitmap-add", qmp_bitmap_add_args, cmd_add);
    qmp_register_command("block-dirty-bitmap-remove", qmp_bitmap_args, cmd_remove);
    qmp_register_command("block-dirty-bitmap-clear", qmp_bitmap_args, cmd_clear);
    qmp_register_command("block-dirty-bitmap-enable", qmp_bitmap_args, cmd_enable);
    qmp_register_command("block-dirty-bitmap-disable", qmp_bitmap_args, cmd_disable);
    qmp_register_command("block-dirty-bitmap-merge", merge_args, cmd_merge);
}
