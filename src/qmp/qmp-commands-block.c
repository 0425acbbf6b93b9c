/*
 * qmp-commands-block.c - node commands: blockdev-add, blockdev-del, query-named-block-nodes,
 * query-block. Handlers run on the QMP thread; the graph (block/graph.c) is only touched there.
 * Replies mirror qemu-storage-daemon 7.2 (BlockDeviceInfo keys, error texts).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/dirty-bitmap.h"
#include "block/graph.h"
#include "nbd/nbd-server.h"
#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"

static json_t *cmd_blockdev_add(json_t *args, VdError **errp)
{
    BlockNode *bs = qmp_blockdev_add(args, errp);
    if (!bs) {
        qmp_error_not_device(errp);
        return NULL;
    }
    return json_object();
}

typedef struct ExportUse {
    BlockNode *node;
    bool used;
} ExportUse;

static void export_uses_node(NbdExport *exp, void *opaque)
{
    ExportUse *u = opaque;
    if (nbd_export_node(exp) == u->node) {
        u->used = true;
    }
}

static const QmpArgSpec blockdev_del_args[] = {{"node-name", QA_STR, true}, {NULL}};

static json_t *cmd_blockdev_del(json_t *args, VdError **errp)
{
    const char *name = qmp_arg_str(args, "node-name", "");
    BlockNode *bs = graph_find_node(name);
    if (bs) {
        ExportUse u = {.node = bs};
        nbd_export_foreach(export_uses_node, &u);
        if (u.used) {
            vd_error_setg(errp, EBUSY, "Node %s is in use", name);
            return NULL;
        }
    }
    if (graph_blockdev_del(name, errp) < 0) {
        qmp_error_not_device(errp);
        return NULL;
    }
    return json_object();
}

/* ---- query-named-block-nodes ---- */

typedef struct NodeList {
    BlockNode **v;
    size_t n, cap;
    bool oom;
} NodeList;

static void list_add(NodeList *l, BlockNode *bs)
{
    for (size_t i = 0; i < l->n; i++) {
        if (l->v[i] == bs) {
            return;
        }
    }
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 16;
        BlockNode **n = realloc(l->v, nc * sizeof(*n));
        if (!n) {
            l->oom = true;
            return;
        }
        l->v = n;
        l->cap = nc;
    }
    l->v[l->n++] = bs;
}

static void collect_tree(NodeList *l, BlockNode *bs, int depth)
{
    for (; bs && depth < 4096; bs = bs->backing, depth++) {
        list_add(l, bs);
        if (bs->file) {
            collect_tree(l, bs->file, depth + 1);
        }
    }
}

static void collect_root(BlockNode *bs, void *opaque)
{
    NodeList *roots = opaque;
    list_add(roots, bs);
}

/* ImageInfo, with the backing chain nested as "backing-image" unless flat. */
static json_t *image_info(BlockNode *bs, bool flat, VdError **errp)
{
    json_t *info = vd_image_info(bs, errp);
    if (!info) {
        return NULL;
    }
    if (!flat && bs->backing) {
        json_t *b = image_info(bs->backing, false, errp);
        if (!b) {
            json_decref(info);
            return NULL;
        }
        json_object_set_new(info, "backing-image", b);
    }
    return info;
}

static json_t *block_device_info(BlockNode *bs, bool flat, VdError **errp)
{
    int depth = 0;
    if (!flat) {
        /* QEMU counts the nested backing images, so a flat query reports 0 (kept for parity). */
        for (BlockNode *b = bs->backing; b && depth < 4096; b = b->backing) {
            depth++;
        }
    }
    json_t *image = image_info(bs, flat, errp);
    if (!image) {
        return NULL;
    }
    const char *backing_file = NULL;
    if (bs->backing) {
        backing_file = bs->backing->filename;
    } else if (bs->backing_file && bs->backing_file[0]) {
        backing_file = bs->full_backing_filename ? bs->full_backing_filename : bs->backing_file;
    }
    json_t *o = json_pack("{s:s,s:s,s:b,s:s}", "file", bs->filename ? bs->filename : "",
                          "node-name", bs->node_name ? bs->node_name : "", "ro", bs->read_only,
                          "drv", bs->drv ? bs->drv->name : "");
    if (!o) {
        json_decref(image);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    int r = 0;
    if (backing_file) {
        r |= json_object_set_new(o, "backing_file", json_string(backing_file));
    }
    r |= json_object_set_new(o, "backing_file_depth", json_integer(depth));
    r |= json_object_set_new(o, "encrypted", json_boolean(bs->encrypted));
    r |= json_object_set_new(o, "detect_zeroes", json_string("off"));
    static const char *const throttle[] = {"bps", "bps_rd", "bps_wr", "iops", "iops_rd",
                                           "iops_wr"};
    for (size_t i = 0; i < sizeof(throttle) / sizeof(throttle[0]); i++) {
        r |= json_object_set_new(o, throttle[i], json_integer(0));
    }
    r |= json_object_set_new(o, "image", image);
    r |= json_object_set_new(o, "cache",
                             json_pack("{s:b,s:b,s:b}", "writeback", 1, "direct",
                                       (bs->open_flags & VD_OPEN_DIRECT) != 0, "no-flush", 0));
    r |= json_object_set_new(o, "write_threshold", json_integer(0));
    json_t *bitmaps = vd_bitmaps_info(bs);
    if (bitmaps) {
        r |= json_object_set_new(o, "dirty-bitmaps", bitmaps);
    }
    if (r) {
        json_decref(o);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    return o;
}

static const QmpArgSpec query_named_block_nodes_args[] = {{"flat", QA_BOOL}, {NULL}};

static json_t *cmd_query_named_block_nodes(json_t *args, VdError **errp)
{
    bool flat = qmp_arg_bool(args, "flat", false);
    NodeList roots = {0}, all = {0};
    graph_foreach(collect_root, &roots);
    /* Newest first, as QEMU lists them; each root followed by its children. */
    for (size_t i = roots.n; i-- > 0;) {
        collect_tree(&all, roots.v[i], 0);
    }
    json_t *list = json_array();
    if (!list || roots.oom || all.oom) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        json_decref(list);
        list = NULL;
    }
    for (size_t i = 0; list && i < all.n; i++) {
        json_t *info = block_device_info(all.v[i], flat, errp);
        if (!info || json_array_append_new(list, info) < 0) {
            json_decref(list);
            list = NULL;
        }
    }
    free(roots.v);
    free(all.v);
    return list;
}

/* vdiskd has no guest devices (BlockBackends), so like qemu-storage-daemon: always []. */
static json_t *cmd_query_block(json_t *args, VdError **errp)
{
    return json_array();
}

void qmp_commands_block_register(void)
{
    /* BlockdevOptions is a union on "driver": graph.c checks it against the driver's table. */
    qmp_register_command("blockdev-add", NULL, cmd_blockdev_add);
    qmp_register_command("blockdev-del", blockdev_del_args, cmd_blockdev_del);
    qmp_register_command("query-named-block-nodes", query_named_block_nodes_args,
                         cmd_query_named_block_nodes);
    qmp_register_command("query-block", qmp_no_args, cmd_query_block);
}
