/*
 * qmp-blockdev.c - blockdev-add: QMP BlockdevOptions checked (types, unknown keys, unsupported
 * members, node-names) against the common members and the driver's own table (BlockDriver.
 * blockdev_options) before anything is opened, so a rejected blockdev-add leaves nothing behind;
 * then the tree is opened and registered in the graph (block/graph.h). QMP thread (or startup).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/graph.h"
#include "qmp/qmp-args.h"
#include "qmp/qmp.h"

#define NODE_NAME_MAX 31 /* QEMU: node names are shorter than 32 bytes */
#define PREFIX_MAX 512

/* ---- BlockdevOptions: the common members (each driver declares its own: blockdev_options) ---- */

static const char *const discard_enum[] = {"ignore", "unmap", "off", "on", NULL};
static const char *const detect_zeroes_enum[] = {"off", "on", "unmap", NULL};

static const QmpArgSpec cache_spec[] = {
    {"direct", QA_BOOL},
    {"no-flush", QA_BOOL},
    {NULL}};

/* BlockdevOptions' base members (driver is checked on its own first). */
static const QmpArgSpec base_spec[] = {
    {"driver", QA_STR, true},
    {"node-name", QA_STR},
    {"discard", QA_ENUM, false, discard_enum},
    {"cache", QA_OBJ, false, NULL, cache_spec},
    {"read-only", QA_BOOL},
    {"auto-read-only", QA_BOOL},
    {"force-share", QA_BOOL},
    {"detect-zeroes", QA_ENUM, false, detect_zeroes_enum},
    {NULL}};

/* Drivers QEMU knows but vdiskd does not implement: a clearer error than "does not accept". */
static const char *const qemu_only_drivers[] = {
    "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "ftp", "ftps", "gluster", "host_cdrom",
    "http", "https", "iscsi", "nfs", "null-aio", "nvme",
    "parallels", "preallocate", "qcow", "qed", "quorum", "replication", "snapshot-access",
    "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat", "io_uring", "virtio-blk-vfio-pci",
    NULL};

/* "qcow2, raw, ...": the drivers blockdev-add offers, from the registry. */
static void offered_drivers(char *buf, size_t size)
{
    size_t len = 0;
    const BlockDriver *d;
    for (size_t i = 0; (d = vd_driver_at(i)) && len < size; i++) {
        if (d->blockdev_options) {
            int n = snprintf(buf + len, size - len, "%s%s", len ? ", " : "", d->name);
            len += n > 0 ? (size_t)n : 0;
        }
    }
}

/* QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
static bool node_name_wellformed(const char *s)
{
    if (!isalpha((unsigned char)s[0])) {
        return false;
    }
    for (const char *p = s + 1; *p; p++) {
        if (!isalnum((unsigned char)*p) && !strchr("-._", *p)) {
            return false;
        }
    }
    return true;
}

/* A SocketAddress member (nbd's "server"): the union's tag first, then its variant's members. */
static int check_sockaddr(json_t *server, const char *sub, VdError **errp)
{
    const QmpArgSpec *vs;
    int r = qmp_sockaddr_variant(server, sub, sub, &vs, errp);
    if (r < 0) {
        return r;
    }
    const QmpArgSpec *const ss[] = {qmp_sockaddr_tag, vs};
    return qmp_args_check(server, sub, ss, 2, errp);
}

/* Pass 1: types, enums, unknown keys, recursively, with dotted names as QEMU reports them. */
static int check_options(json_t *o, const char *prefix, VdError **errp)
{
    json_t *drv = json_object_get(o, "driver");
    if (!drv) {
        vd_error_setg(errp, EINVAL, "Parameter '%sdriver' is missing", prefix);
        return -EINVAL;
    }
    if (!json_is_string(drv)) {
        vd_error_setg(errp, EINVAL, "Invalid parameter type for '%sdriver', expected: string",
                      prefix);
        return -EINVAL;
    }
    const char *dname = json_string_value(drv);
    const BlockDriver *d = vd_find_driver(dname);
    if (!d || !d->blockdev_options) {
        for (const char *const *q = qemu_only_drivers; *q; q++) {
            if (!strcmp(*q, dname)) {
                char list[256] = "";
                offered_drivers(list, sizeof(list));
                vd_error_setg(errp, ENOTSUP, "Block driver '%s' is not supported by vdiskd "
                              "(supported: %s)", dname, list);
                return -ENOTSUP;
            }
        }
        /* the bare member name, as QEMU's enum visitor says it at any depth */
        vd_error_setg(errp, EINVAL, "Parameter 'driver' does not accept value '%s'", dname);
        return -EINVAL;
    }
    const QmpArgSpec *const specs[] = {base_spec, d->blockdev_options};
    int r = qmp_args_check(o, prefix, specs, 2, errp);
    if (r < 0) {
        return r;
    }
    char sub[PREFIX_MAX];
    const char *children[] = {"file", "backing", "data-file"};
    for (int i = 0; i < 3; i++) {
        json_t *c = json_object_get(o, children[i]);
        if (json_is_object(c)) {
            snprintf(sub, sizeof(sub), "%s%s.", prefix, children[i]);
            if ((r = check_options(c, sub, errp)) < 0) {
                return r;
            }
        }
    }
    for (const QmpArgSpec *s = d->blockdev_options; s->name; s++) {
        json_t *v = json_object_get(o, s->name);
        if (s->type == QA_SOCKADDR && v) {
            snprintf(sub, sizeof(sub), "%s%s.", prefix, s->name);
            if ((r = check_sockaddr(v, sub, errp)) < 0) {
                return r;
            }
        }
    }
    /*
     * A protocol's child given as a node name (blkdebug's image): the driver takes that node
     * from the graph when it opens; it must exist (QSD's message).
     */
    for (const QmpArgSpec *s = d->blockdev_options; d->is_protocol && s->name; s++) {
        json_t *ref = json_object_get(o, s->name);
        if (s->type == VD_OPT_REF && json_is_string(ref) &&
            !graph_find_node(json_string_value(ref))) {
            vd_error_setg(errp, ENXIO, "Cannot find device='%s' nor node-name='%s'",
                          json_string_value(ref), json_string_value(ref));
            return -ENXIO;
        }
    }
    const char *encfmt = qmp_arg_str(json_object_get(o, "encrypt"), "format", "luks");
    if (strcmp(encfmt, "luks") != 0) {
        vd_error_setg(errp, ENOTSUP, "'%sencrypt.format': '%s' (legacy AES) is not supported by "
                      "vdiskd", prefix, encfmt);
        return -ENOTSUP;
    }
    const char *dz = qmp_arg_str(o, "detect-zeroes", "off");
    if (strcmp(dz, "off") != 0) {
        vd_error_setg(errp, ENOTSUP, "'%sdetect-zeroes': '%s' is not supported by vdiskd", prefix,
                      dz);
        return -ENOTSUP;
    }
    for (const QmpArgSpec *s = d->blockdev_options; s->name; s++) {
        if (s->unsupported && json_object_get(o, s->name)) {
            vd_error_setg(errp, ENOTSUP, "'%s%s' is not supported by vdiskd%s", prefix, s->name,
                          s->unsupported);
            return -ENOTSUP;
        }
    }
    return 0;
}

/* Pass 2: node-names valid and unique, within the new tree and against existing nodes. */
static int check_names(json_t *o, const char **seen, int *nseen, int max, VdError **errp)
{
    const char *name = qmp_arg_str(o, "node-name", NULL);
    if (name) {
        if (!node_name_wellformed(name)) {
            vd_error_setg(errp, EINVAL, "Invalid node-name: '%s'", name);
            return -EINVAL;
        }
        if (strlen(name) > NODE_NAME_MAX) {
            vd_error_setg(errp, EINVAL, "Node name too long");
            return -EINVAL;
        }
        bool dup = graph_find_node(name) != NULL;
        for (int i = 0; i < *nseen && !dup; i++) {
            dup = !strcmp(seen[i], name);
        }
        if (dup) {
            vd_error_setg(errp, EEXIST, "Duplicate nodes with node-name='%s'", name);
            return -EEXIST;
        }
        if (*nseen < max) {
            seen[(*nseen)++] = name;
        }
    }
    const char *children[] = {"file", "backing", "data-file"};
    for (int i = 0; i < 3; i++) {
        json_t *c = json_object_get(o, children[i]);
        int r;
        if (json_is_object(c) && (r = check_names(c, seen, nseen, max, errp)) < 0) {
            return r;
        }
    }
    return 0;
}

/* Inherited by children that do not set them, as QEMU's child options inherit. */
typedef struct Inherit {
    bool read_only;
    bool direct;
    bool force_share;
} Inherit;

static BlockNode *open_tree(json_t *o, const Inherit *parent, bool is_backing, VdError **errp);

/* A child given as a node-name reference or an inline object; returns a new reference. */
static BlockNode *child_node(json_t *ref, const Inherit *inh, bool is_backing, VdError **errp)
{
    if (json_is_string(ref)) {
        const char *name = json_string_value(ref);
        BlockNode *bs = graph_find_node(name);
        if (!bs) {
            vd_error_setg(errp, ENXIO, "Cannot find device='%s' nor node-name='%s'", name, name);
            return NULL;
        }
        vd_node_ref(bs);
        return bs;
    }
    return open_tree(ref, inh, is_backing, errp);
}

/* Open a protocol node by the filename built for it (freed here; NULL: *errp is set already). */
static BlockNode *open_by_name(VdOpenOptions *opts, const char *drv, char *filename,
                               VdError **errp)
{
    if (!filename) {
        return NULL;
    }
    opts->filename = filename;
    opts->format = drv;
    BlockNode *bs = vd_open(opts, errp);
    free(filename);
    return bs;
}

/* Pass 3: open. Returns a node with one reference (the caller's), or NULL. */
static BlockNode *open_tree(json_t *o, const Inherit *parent, bool is_backing, VdError **errp)
{
    const char *drv = qmp_arg_str(o, "driver", "");
    json_t *cache = json_object_get(o, "cache");
    Inherit inh = {
        .read_only = is_backing || qmp_arg_bool(o, "read-only", parent->read_only),
        .direct = qmp_arg_bool(cache, "direct", parent->direct),
        .force_share = qmp_arg_bool(o, "force-share", parent->force_share),
    };
    if (inh.force_share && !inh.read_only) {
        vd_error_setg(errp, EINVAL, "force-share=on can only be used with read-only images");
        return NULL;
    }
    int flags = (inh.read_only ? 0 : VD_OPEN_RDWR) | (inh.direct ? VD_OPEN_DIRECT : 0) |
                (inh.force_share ? VD_OPEN_FORCE_SHARE : 0);
    VdOpenOptions opts = {.node_name = qmp_arg_str(o, "node-name", NULL), .flags = flags};

    const BlockDriver *d = vd_find_driver(drv); /* check_options found it */
    if (d->is_protocol) {
        if (!d->blockdev_filename) {
            /*
             * The driver reads its own members from the option tree (null-co's size, blkdebug's
             * image and rules); one without a filename is named as QEMU names it: by the options
             * that name it (json:{...}), else by its URI ("null-co://").
             */
            bool failed = false;
            char *uri = vd_json_node_name(d, o, NULL, &failed);
            const char *fn = qmp_arg_str(o, "filename", NULL);
            if (failed || (!uri && !fn && d->uri_schemes &&
                           asprintf(&uri, "%s://", d->uri_schemes[0]) < 0)) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                return NULL;
            }
            if (!strcmp(drv, "blkdebug") && vd_blkdebug_order_rules(o, true) < 0) {
                free(uri);
                vd_error_setg(errp, ENOMEM, "Out of memory");
                return NULL;
            }
            opts.filename = uri ? uri : fn ? fn : drv;
            opts.format = drv;
            opts.options = o;
            BlockNode *bs = vd_open(&opts, errp);
            free(uri);
            return bs;
        }
        VdJsonOptReader reader;
        vd_json_opt_reader_init(&reader, o);
        opts.tls_creds = qmp_arg_str(o, "tls-creds", NULL); /* nbd: NBD over TLS */
        return open_by_name(&opts, drv, d->blockdev_filename(&reader.r, errp), errp);
    }

    /* Formats (raw, qcow2): a file child, maybe a backing one. */
    BlockNode *file = child_node(json_object_get(o, "file"), &inh, false, errp);
    if (!file) {
        return NULL;
    }
    if (!inh.read_only && file->read_only) {
        vd_error_setg(errp, EACCES, "Block node '%s' is read-only: cannot open '%s' read-write "
                      "on it", file->node_name, opts.node_name ? opts.node_name : drv);
        vd_node_unref(file);
        return NULL;
    }
    BlockNode *backing = NULL;
    json_t *dref = json_object_get(o, "data-file");
    if (dref && !(opts.data_file = child_node(dref, &inh, false, errp))) {
        vd_node_unref(file);
        return NULL;
    }
    json_t *bref = json_object_get(o, "backing");
    if (json_is_null(bref)) {
        opts.flags |= VD_OPEN_NO_BACKING;
    } else if (bref) {
        backing = child_node(bref, &inh, true, errp);
        if (!backing) {
            vd_error_prepend(errp, "Could not open backing file: ");
            vd_node_unref(file);
            vd_node_unref(opts.data_file);
            return NULL;
        }
    }
    /* Before opening: a read-write qcow2 open may already write (dirty flag, repairs). */
    if (!(inh.force_share) && graph_check_sharing(file, !inh.read_only, errp) < 0) {
        vd_node_unref(file);
        vd_node_unref(backing);
        return NULL;
    }
    opts.format = drv;
    opts.file = file;
    opts.options = o; /* the format's own members (raw's offset and size) */
    opts.backing = backing;
    opts.snapshot = qmp_arg_str(o, "snapshot", NULL);
    /* the password of an encrypted format: luks "key-secret", qcow2 "encrypt": {"key-secret"} */
    opts.key_secret = qmp_arg_str(o, "key-secret",
                                  qmp_arg_str(json_object_get(o, "encrypt"), "key-secret", NULL));
    if (opts.snapshot && !inh.read_only) {
        vd_error_setg(errp, EINVAL, "'snapshot' (an internal snapshot) can only be opened with "
                      "read-only=true");
        vd_node_unref(file);
        vd_node_unref(backing);
        vd_node_unref(opts.data_file);
        return NULL;
    }
    BlockNode *bs = vd_open(&opts, errp);
    bool failed = false;
    char *name = bs ? vd_json_node_name(bs->drv, o, file, &failed) : NULL;
    if (name) { /* over a child named json:{...}, QEMU names the format node by its tree too */
        free(bs->filename);
        bs->filename = name;
    } else if (failed) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        vd_node_unref(bs);
        bs = NULL;
    }
    /* vd_open took its own references on file, backing and data file. */
    vd_node_unref(file);
    vd_node_unref(backing);
    vd_node_unref(opts.data_file);
    return bs;
}

BlockNode *qmp_blockdev_add(json_t *options, VdError **errp)
{
    if (!json_is_object(options)) {
        vd_error_setg(errp, EINVAL, "Invalid parameter type, expected: object");
        return NULL;
    }
    int r = check_options(options, "", errp);
    if (r < 0) {
        return NULL;
    }
    if (!json_object_get(options, "node-name")) {
        vd_error_setg(errp, EINVAL, "'node-name' must be specified for the root node");
        return NULL;
    }
    const char *seen[64];
    int nseen = 0;
    if (check_names(options, seen, &nseen, 64, errp) < 0) {
        return NULL;
    }
    Inherit top = {0};
    BlockNode *bs = open_tree(options, &top, false, errp);
    if (!bs) {
        return NULL;
    }
    if (graph_add_root(bs, errp) < 0) {
        vd_node_unref(bs);
        return NULL;
    }
    return bs; /* the registry owns the reference vd_open returned */
}
