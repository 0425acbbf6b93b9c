/*
 * qmp-commands-nbd.c - NBD server and export commands: nbd-server-start/stop, block-export-add/
 * del, query-block-exports, and the legacy nbd-server-add/remove. Runs on the QMP thread; the
 * NBD server (nbd/nbd-server.h) does the work. BLOCK_EXPORT_DELETED is emitted for every export
 * that goes away through these commands (deletion is synchronous here, so never "shutting-down").
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/graph.h"
#include "jobs/mirror.h"
#include "nbd/nbd-server.h"
#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"

#define NBD_MAX_STRING 4096 /* NBD protocol limit on export names and descriptions */

static const char *const export_type_enum[] = {"nbd", "vhost-user-blk", "fuse", "vduse-blk",
                                               NULL};
static const char *const del_mode_enum[] = {"safe", "hard", NULL};

static void emit_export_deleted(const char *id)
{
    qmp_event_emit("BLOCK_EXPORT_DELETED", json_pack("{s:s}", "id", id));
}

/*
 * addr: QEMU 7.2's nbd-server-start takes SocketAddressLegacy ({"type", "data": {...}}); the
 * flat SocketAddress form ({"type", "host", "port"} / {"type", "path"}) of newer interfaces and
 * of --nbd-server is accepted too.
 */
static int parse_addr(json_t *a, NbdServerAddress *out, VdError **errp)
{
    /* QEMU names the tag without its "addr." path in its value's message; so do we. */
    const QmpArgSpec *variant;
    int r = qmp_sockaddr_variant(a, "addr.", json_is_string(json_object_get(a, "type")) ? "" :
                                 "addr.", &variant, errp);
    if (r < 0) {
        return r;
    }
    json_t *fields;
    if (json_object_get(a, "data") || (!json_object_get(a, "host") &&
                                       !json_object_get(a, "path"))) {
        static const QmpArgSpec legacy_spec[] = {{"type", QA_STR, true}, {"data", QA_OBJ, true},
                                                 {NULL}};
        if ((r = qmp_args_check1(a, "addr.", legacy_spec, errp)) < 0) {
            return r;
        }
        fields = json_object_get(a, "data");
        if ((r = qmp_args_check1(fields, "addr.data.", variant, errp)) < 0) {
            return r;
        }
    } else {
        const QmpArgSpec *const specs[] = {qmp_sockaddr_tag, variant};
        if ((r = qmp_args_check(a, "addr.", specs, 2, errp)) < 0) {
            return r;
        }
        fields = a;
    }
    if (variant == qmp_sockaddr_inet) {
        out->type = NBD_ADDR_INET;
        out->host = (char *)qmp_arg_str(fields, "host", NULL);
        out->port = (char *)qmp_arg_str(fields, "port", NULL);
    } else {
        if (qmp_arg_bool(fields, "abstract", false)) {
            vd_error_setg(errp, ENOTSUP, "Abstract UNIX sockets are not supported by vdiskd");
            return -ENOTSUP;
        }
        out->type = NBD_ADDR_UNIX;
        out->path = (char *)qmp_arg_str(fields, "path", NULL);
    }
    return 0;
}

static const QmpArgSpec nbd_server_start_args[] = {
    {"addr", QA_OBJ, true}, /* a union on "type": parse_addr checks its members */
    {"tls-creds", QA_STR},
    {"tls-authz", QA_STR},
    {"max-connections", QA_U32},
    {NULL}};

static json_t *cmd_nbd_server_start(json_t *args, VdError **errp)
{
    NbdServerAddress addr = {0};
    if (parse_addr(json_object_get(args, "addr"), &addr, errp) < 0) {
        return NULL;
    }
    if (nbd_server_running()) {
        vd_error_setg(errp, EEXIST, "NBD server already running");
        return NULL;
    }
    VdTlsCreds *creds = NULL;
    VdAuthz *authz = NULL;
    if (nbd_server_tls_lookup(qmp_arg_str(args, "tls-creds", NULL),
                              qmp_arg_str(args, "tls-authz", NULL), &creds, &authz, errp) < 0) {
        qmp_error_not_device(errp);
        return NULL;
    }
    json_t *mc = json_object_get(args, "max-connections");
    uint32_t max_conn = mc ? (uint32_t)json_integer_value(mc) : 0;
    if (nbd_server_start_tls(&addr, max_conn, creds, authz, errp) < 0) {
        vd_tls_creds_unref(creds);
        vd_authz_unref(authz);
        qmp_error_not_device(errp);
        return NULL;
    }
    return json_object();
}

typedef struct IdList {
    char **ids;
    size_t n, cap;
    bool oom;
} IdList;

static void collect_id(NbdExport *exp, void *opaque)
{
    IdList *l = opaque;
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 8;
        char **n = realloc(l->ids, nc * sizeof(*n));
        if (!n) {
            l->oom = true;
            return;
        }
        l->ids = n;
        l->cap = nc;
    }
    char *id = strdup(nbd_export_id(exp));
    if (!id) {
        l->oom = true;
        return;
    }
    l->ids[l->n++] = id;
}

static json_t *cmd_nbd_server_stop(json_t *args, VdError **errp)
{
    if (!nbd_server_running()) {
        vd_error_setg(errp, EINVAL, "NBD server not running");
        return NULL;
    }
    IdList l = {0};
    nbd_export_foreach(collect_id, &l);
    nbd_server_stop();
    for (size_t i = 0; i < l.n; i++) {
        emit_export_deleted(l.ids[i]);
        free(l.ids[i]);
    }
    free(l.ids);
    return json_object();
}

/* The shared tail of block-export-add and nbd-server-add. */
/* QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
static bool id_wellformed(const char *s)
{
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'))) {
        return false;
    }
    for (s++; *s; s++) {
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-' || *s == '.' || *s == '_')) {
            return false;
        }
    }
    return true;
}

static json_t *export_add(const char *id, const char *node_name, bool node_as_device,
                          const char *name, bool writable, const char *description,
                          json_t *bitmaps, bool alloc_depth, VdError **errp)
{
    if (!node_as_device && !id_wellformed(id)) {
        vd_error_setg(errp, EINVAL, "Invalid block export id");
        return NULL;
    }
    if (nbd_export_find(id)) {
        vd_error_setg(errp, EEXIST, "Block export id '%s' is already in use", id);
        return NULL;
    }
    BlockNode *bs = graph_find_node(node_name);
    if (!bs) {
        vd_error_setg(errp, ENXIO, "Cannot find device='%s' nor node-name='%s'",
                      node_as_device ? node_name : "", node_name);
        return NULL;
    }
    if (!nbd_server_running()) {
        vd_error_setg(errp, EINVAL, "NBD server not running");
        return NULL;
    }
    if (strlen(name) > NBD_MAX_STRING) {
        vd_error_setg(errp, EINVAL, "export name '%s' too long", name);
        return NULL;
    }
    if (description && strlen(description) > NBD_MAX_STRING) {
        vd_error_setg(errp, EINVAL, "description '%s' too long", description);
        return NULL;
    }
    if (nbd_export_find_by_name(name)) {
        vd_error_setg(errp, EEXIST, "NBD server already has export named '%s'", name);
        return NULL;
    }
    if (writable && bs->read_only) {
        /* (QEMU's legacy nbd-server-add lets this through; a writable export of a read-only
         * node can only fail its writes, so vdiskd refuses it on both paths.) */
        vd_error_setg(errp, EACCES, "Cannot export read-only node as writable");
        return NULL;
    }
    size_t n = json_array_size(bitmaps);
    VdBitmapRef *refs = calloc(n ? n : 1, sizeof(*refs));
    if (!refs) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    NbdExport *exp = NULL;
    /* A node a mirror copies is written through the mirror's filter, or the write is never
     * copied (nor journalled): an export added while the copy runs uses the filter, as
     * vdiskd's --export does for a resumed copy. The bitmaps stay the node's own. */
    BlockNode *filter = mirror_filter_of_source(bs);
    if (qmp_bitmap_refs(bitmaps, bs, true, refs, errp) == 0) {
        exp = nbd_export_add_full(id, name, filter ? filter : bs, writable, description, refs,
                                  n, alloc_depth, errp);
    }
    free(refs);
    if (!exp) {
        qmp_error_not_device(errp);
        return NULL;
    }
    return json_object();
}

static json_t *cmd_block_export_add(json_t *args, VdError **errp)
{
    static const QmpArgSpec base_spec[] = {
        {"type", QA_ENUM, true, export_type_enum},
        {"id", QA_STR, true},
        {"fixed-iothread", QA_BOOL},
        {"iothread", QA_STR},
        {"node-name", QA_STR, true},
        {"writable", QA_BOOL},
        {"writethrough", QA_BOOL},
        {NULL}};
    static const QmpArgSpec nbd_spec[] = {
        {"name", QA_STR},
        {"description", QA_STR},
        {"bitmaps", QA_ARRAY},
        {"allocation-depth", QA_BOOL},
        {NULL}};
    /* The union's tag first, so a non-nbd export gets a clear refusal, not "unexpected". */
    json_t *t = json_object_get(args, "type");
    if (!t) {
        vd_error_setg(errp, EINVAL, "Parameter 'type' is missing");
        return NULL;
    }
    const QmpArgSpec *const specs[] = {base_spec, nbd_spec};
    if (json_is_string(t) && strcmp(json_string_value(t), "nbd") != 0) {
        static const QmpArgSpec type_spec[] = {{"type", QA_ENUM, true, export_type_enum},
                                               {NULL}};
        json_t *tonly = json_pack("{s:O}", "type", t);
        int r = qmp_args_check1(tonly, "", type_spec, errp);
        json_decref(tonly);
        if (r == 0) {
            vd_error_setg(errp, ENOTSUP, "Export type '%s' is not supported by vdiskd (only nbd)",
                          json_string_value(t));
        }
        return NULL;
    }
    if (qmp_args_check(args, "", specs, 2, errp) < 0 ||
        qmp_bitmap_refs_check(json_object_get(args, "bitmaps"), errp) < 0) {
        return NULL;
    }
    if (json_object_get(args, "iothread")) {
        vd_error_setg(errp, ENOTSUP, "'iothread' is not supported by vdiskd");
        return NULL;
    }
    const char *node = qmp_arg_str(args, "node-name", "");
    /* writethrough: accepted; vdiskd's writes are flushed on NBD FLUSH/FUA like QEMU's default. */
    return export_add(qmp_arg_str(args, "id", ""), node, false, qmp_arg_str(args, "name", node),
                      qmp_arg_bool(args, "writable", false),
                      qmp_arg_str(args, "description", NULL), json_object_get(args, "bitmaps"),
                      qmp_arg_bool(args, "allocation-depth", false), errp);
}

static int export_del(const char *id, bool hard, VdError **errp)
{
    NbdExport *exp = nbd_export_find(id);
    if (!exp) {
        vd_error_setg(errp, ENXIO, "Export '%s' is not found", id);
        return -ENXIO;
    }
    char *saved = strdup(id); /* id may point into the export, which is about to go */
    if (!saved) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    int r = nbd_export_del(saved, hard, errp);
    if (r == 0) {
        emit_export_deleted(saved);
    } else {
        qmp_error_not_device(errp);
    }
    free(saved);
    return r;
}

static const QmpArgSpec block_export_del_args[] = {
    {"id", QA_STR, true},
    {"mode", QA_ENUM, false, del_mode_enum},
    {NULL}};

static json_t *cmd_block_export_del(json_t *args, VdError **errp)
{
    bool hard = !strcmp(qmp_arg_str(args, "mode", "safe"), "hard");
    if (export_del(qmp_arg_str(args, "id", ""), hard, errp) < 0) {
        return NULL;
    }
    return json_object();
}

static void export_info(NbdExport *exp, void *opaque)
{
    json_t *list = opaque;
    BlockNode *bs = nbd_export_node(exp);
    json_array_append_new(list, json_pack("{s:s,s:s,s:s,s:b}", "type", "nbd", "id",
                                          nbd_export_id(exp), "node-name",
                                          bs && bs->node_name ? bs->node_name : "",
                                          "shutting-down", 0));
}

static json_t *cmd_query_block_exports(json_t *args, VdError **errp)
{
    json_t *list = json_array();
    if (!list) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    nbd_export_foreach(export_info, list);
    return list;
}

/* Legacy: the export's id is its name (which defaults to the device). */
static const QmpArgSpec nbd_server_add_args[] = {
    {"device", QA_STR, true},
    {"name", QA_STR},
    {"description", QA_STR},
    {"writable", QA_BOOL},
    {"bitmap", QA_STR},
    {NULL}};

static json_t *cmd_nbd_server_add(json_t *args, VdError **errp)
{
    if (!nbd_server_running()) {
        vd_error_setg(errp, EINVAL, "NBD server not running");
        return NULL;
    }
    const char *device = qmp_arg_str(args, "device", "");
    const char *name = qmp_arg_str(args, "name", device);
    json_t *bitmap = json_object_get(args, "bitmap");
    json_t *bitmaps = bitmap ? json_pack("[O]", bitmap) : NULL;
    json_t *ret = export_add(name, device, true, name, qmp_arg_bool(args, "writable", false),
                             qmp_arg_str(args, "description", NULL), bitmaps, false, errp);
    json_decref(bitmaps);
    return ret;
}

static const QmpArgSpec nbd_server_remove_args[] = {
    {"name", QA_STR, true},
    {"mode", QA_ENUM, false, del_mode_enum},
    {NULL}};

static json_t *cmd_nbd_server_remove(json_t *args, VdError **errp)
{
    const char *name = qmp_arg_str(args, "name", "");
    NbdExport *exp = nbd_server_running() ? nbd_export_find_by_name(name) : NULL;
    if (!exp) {
        vd_error_setg(errp, ENXIO, "Export '%s' is not found", name);
        return NULL;
    }
    bool hard = !strcmp(qmp_arg_str(args, "mode", "safe"), "hard");
    if (export_del(nbd_export_id(exp), hard, errp) < 0) {
        return NULL;
    }
    return json_object();
}

void qmp_commands_nbd_register(void)
{
    qmp_register_command("nbd-server-start", nbd_server_start_args, cmd_nbd_server_start);
    qmp_register_command("nbd-server-stop", qmp_no_args, cmd_nbd_server_stop);
    /* BlockExportOptions is a union on "type": the handler checks the variant's members. */
    qmp_register_command("block-export-add", NULL, cmd_block_export_add);
    qmp_register_command("block-export-del", block_export_del_args, cmd_block_export_del);
    qmp_register_command("query-block-exports", qmp_no_args, cmd_query_block_exports);
    qmp_register_command("nbd-server-add", nbd_server_add_args, cmd_nbd_server_add);
    qmp_register_command("nbd-server-remove", nbd_server_remove_args, cmd_nbd_server_remove);
}
