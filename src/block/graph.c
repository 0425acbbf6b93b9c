/*
 * graph.c - vdiskd's named block nodes (see graph.h): blockdev-add from QMP BlockdevOptions,
 * blockdev-del, lookup by node-name. The registry holds the monitor-owned roots, one reference
 * each; children (file, backing) are reached through the nodes themselves, so lookups see every
 * node in the daemon. Options are fully checked (types, unknown keys, node-names) before anything
 * is opened, so a rejected blockdev-add leaves nothing behind. QMP thread (or startup) only: block
 * jobs hand their graph changes to the QMP thread (qmp_defer), so the registry needs no lock.
 */
#include "block/graph.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "protocols/nbd.h"
#include "protocols/rbd.h"
#include "qmp/qmp-args.h"

#define NODE_NAME_MAX 31 /* QEMU: node names are shorter than 32 bytes */
#define PREFIX_MAX 512

static BlockNode **roots;
static size_t nroots, roots_cap;
/* The roots graph_register added (a subset of roots; no reference of their own). */
static BlockNode **implicit;
static size_t nimplicit, implicit_cap;

/* ---- lookup ---- */

static BlockNode *find_below(BlockNode *bs, const char *name, int depth)
{
    /* Chains are built without loops (block.c checks); depth bounds a corrupted graph anyway. */
    while (bs && depth < 4096) {
        if (bs->node_name && !strcmp(bs->node_name, name)) {
            return bs;
        }
        BlockNode *f = bs->file ? find_below(bs->file, name, depth + 1) : NULL;
        if (f) {
            return f;
        }
        bs = bs->backing;
        depth++;
    }
    return NULL;
}

BlockNode *graph_find_node(const char *node_name)
{
    if (!node_name) {
        return NULL;
    }
    for (size_t i = 0; i < nroots; i++) {
        if (roots[i]->node_name && !strcmp(roots[i]->node_name, node_name)) {
            return roots[i];
        }
    }
    for (size_t i = 0; i < nroots; i++) {
        BlockNode *bs = find_below(roots[i], node_name, 0);
        if (bs) {
            return bs;
        }
    }
    return NULL;
}

static ssize_t root_index(BlockNode *bs)
{
    for (size_t i = 0; i < nroots; i++) {
        if (roots[i] == bs) {
            return (ssize_t)i;
        }
    }
    return -1;
}

/* Room for one more entry in a node array (*v, n used of *cap). */
static int nodes_reserve(BlockNode ***v, size_t n, size_t *cap, VdError **errp)
{
    if (n < *cap) {
        return 0;
    }
    size_t nc = *cap ? *cap * 2 : 16;
    BlockNode **nv = realloc(*v, nc * sizeof(**v));
    if (!nv) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    *v = nv;
    *cap = nc;
    return 0;
}

static int roots_append(BlockNode *bs, VdError **errp)
{
    int r = nodes_reserve(&roots, nroots, &roots_cap, errp);
    if (r == 0) {
        roots[nroots++] = bs;
    }
    return r;
}

int graph_register(BlockNode *node, VdError **errp)
{
    if (!node || !node->node_name) {
        vd_error_setg(errp, EINVAL, "A node needs a node-name to be registered");
        return -EINVAL;
    }
    if (root_index(node) >= 0) {
        return 0; /* already monitor-owned: keep the single reference */
    }
    BlockNode *other = graph_find_node(node->node_name);
    if (other && other != node) {
        vd_error_setg(errp, EEXIST, "Duplicate nodes with node-name='%s'", node->node_name);
        return -EEXIST;
    }
    int r = nodes_reserve(&implicit, nimplicit, &implicit_cap, errp);
    if (r == 0) {
        r = roots_append(node, errp);
    }
    if (r == 0) {
        vd_node_ref(node);
        implicit[nimplicit++] = node;
    }
    return r;
}

static ssize_t implicit_index(BlockNode *bs)
{
    for (size_t i = 0; i < nimplicit; i++) {
        if (implicit[i] == bs) {
            return (ssize_t)i;
        }
    }
    return -1;
}

/* Remove roots[idx] (and its implicit mark) and drop the registry's reference. */
static void root_remove(size_t idx)
{
    BlockNode *bs = roots[idx];
    memmove(&roots[idx], &roots[idx + 1], (nroots - idx - 1) * sizeof(*roots));
    nroots--;
    ssize_t k = implicit_index(bs);
    if (k >= 0) {
        implicit[k] = implicit[--nimplicit];
    }
    vd_node_unref(bs);
}

void graph_replace_node(BlockNode *old, BlockNode *new_node)
{
    ssize_t idx = old && new_node && old != new_node ? root_index(old) : -1;
    if (idx < 0) {
        return;
    }
    vd_node_ref(new_node);
    roots[idx] = new_node;
    ssize_t k = implicit_index(old);
    if (k >= 0) {
        implicit[k] = new_node;
    }
    vd_node_unref(old);
}

void graph_foreach(void (*cb)(BlockNode *node, void *opaque), void *opaque)
{
    for (size_t i = 0; i < nroots; i++) {
        cb(roots[i], opaque);
    }
}

void graph_close_all(void)
{
    /* Newest first: later nodes may sit on top of earlier ones (refcounts make any order safe). */
    while (nroots > 0) {
        BlockNode *bs = roots[--nroots];
        vd_flush(bs);
        vd_node_unref(bs);
    }
    free(roots);
    roots = NULL;
    roots_cap = 0;
    free(implicit);
    implicit = NULL;
    nimplicit = implicit_cap = 0;
}

/* ---- BlockdevOptions schema (the subset vdiskd implements) ---- */

static const char *const discard_enum[] = {"ignore", "unmap", "off", "on", NULL};
static const char *const detect_zeroes_enum[] = {"off", "on", "unmap", NULL};
static const char *const aio_enum[] = {"threads", "native", "io_uring", NULL};
static const char *const on_off_auto_enum[] = {"auto", "on", "off", NULL};
static const char *const sock_type_enum[] = {"inet", "unix", "vsock", "fd", NULL};

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

static const QmpArgSpec file_spec[] = {
    {"filename", QA_STR, true},
    {"pr-manager", QA_STR},
    {"locking", QA_ENUM, false, on_off_auto_enum},
    {"aio", QA_ENUM, false, aio_enum},
    {"aio-max-batch", QA_INT},
    {"drop-cache", QA_BOOL},
    {"x-check-cache-dropped", QA_BOOL},
    {NULL}};

static const QmpArgSpec raw_spec[] = {
    {"file", QA_REF, true},
    {"offset", QA_INT},
    {"size", QA_INT},
    {NULL}};

static const QmpArgSpec qcow2_spec[] = {
    {"file", QA_REF, true},
    {"backing", QA_REF_NULL},
    {"lazy-refcounts", QA_BOOL},
    {"pass-discard-request", QA_BOOL},
    {"pass-discard-snapshot", QA_BOOL},
    {"pass-discard-other", QA_BOOL},
    {"overlap-check", QA_ANY},
    {"cache-size", QA_INT},
    {"l2-cache-size", QA_INT},
    {"l2-cache-entry-size", QA_INT},
    {"refcount-cache-size", QA_INT},
    {"cache-clean-interval", QA_INT},
    {"encrypt", QA_ANY},
    {"data-file", QA_ANY},
    {"snapshot", QA_STR}, /* vdisk: serve this internal snapshot (id or name), read-only */
    {NULL}};

/* SocketAddress (flat), as blockdev-add's nbd "server" takes it. */
static const QmpArgSpec sock_base_spec[] = {{"type", QA_ENUM, true, sock_type_enum}, {NULL}};
static const QmpArgSpec sock_inet_spec[] = {
    {"host", QA_STR, true},
    {"port", QA_STR, true},
    {"numeric", QA_BOOL},
    {"to", QA_INT},
    {"ipv4", QA_BOOL},
    {"ipv6", QA_BOOL},
    {"keep-alive", QA_BOOL},
    {NULL}};
static const QmpArgSpec sock_unix_spec[] = {
    {"path", QA_STR, true},
    {"abstract", QA_BOOL},
    {"tight", QA_BOOL},
    {NULL}};

static const QmpArgSpec nbd_spec[] = {
    {"server", QA_OBJ, true},
    {"export", QA_STR},
    {"tls-creds", QA_STR},
    {"tls-hostname", QA_STR},
    {"x-dirty-bitmap", QA_STR},
    {"reconnect-delay", QA_U32},
    {"open-timeout", QA_U32},
    {NULL}};

/* BlockdevOptionsRbd; encrypt, key-secret, auth-client-required and server are refused below. */
static const QmpArgSpec rbd_spec[] = {
    {"pool", QA_STR, true},
    {"namespace", QA_STR},
    {"image", QA_STR, true},
    {"conf", QA_STR},
    {"snapshot", QA_STR},
    {"user", QA_STR},
    {"encrypt", QA_ANY},
    {"auth-client-required", QA_ANY},
    {"key-secret", QA_STR},
    {"server", QA_ANY},
    {NULL}};

typedef struct DriverSpec {
    const char *name;
    const QmpArgSpec *spec;
} DriverSpec;

static const DriverSpec drivers[] = {
    {"file", file_spec},
    {"raw", raw_spec},
    {"qcow2", qcow2_spec},
    {"nbd", nbd_spec},
    {"rbd", rbd_spec},
    {NULL, NULL}};

/* Drivers QEMU knows but vdiskd does not implement: a clearer error than "does not accept". */
static const char *const qemu_only_drivers[] = {
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "ftp", "ftps", "gluster", "host_cdrom",
    "host_device", "http", "https", "iscsi", "luks", "nfs", "null-aio", "null-co", "nvme",
    "parallels", "preallocate", "qcow", "qed", "quorum", "replication", "snapshot-access",
    "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat", "io_uring", "virtio-blk-vfio-pci",
    NULL};

static const DriverSpec *find_driver_spec(const char *name)
{
    for (const DriverSpec *d = drivers; d->name; d++) {
        if (!strcmp(d->name, name)) {
            return d;
        }
    }
    return NULL;
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
    const DriverSpec *d = find_driver_spec(dname);
    if (!d) {
        for (const char *const *q = qemu_only_drivers; *q; q++) {
            if (!strcmp(*q, dname)) {
                vd_error_setg(errp, ENOTSUP, "Block driver '%s' is not supported by vdiskd "
                              "(supported: file, raw, qcow2, nbd, rbd)", dname);
                return -ENOTSUP;
            }
        }
        vd_error_setg(errp, EINVAL, "Parameter '%sdriver' does not accept value '%s'", prefix,
                      dname);
        return -EINVAL;
    }
    const QmpArgSpec *const specs[] = {base_spec, d->spec};
    int r = qmp_args_check(o, prefix, specs, 2, errp);
    if (r < 0) {
        return r;
    }
    char sub[PREFIX_MAX];
    const char *children[] = {"file", "backing"};
    for (int i = 0; i < 2; i++) {
        json_t *c = json_object_get(o, children[i]);
        if (json_is_object(c)) {
            snprintf(sub, sizeof(sub), "%s%s.", prefix, children[i]);
            if ((r = check_options(c, sub, errp)) < 0) {
                return r;
            }
        }
    }
    if (!strcmp(dname, "nbd")) {
        json_t *server = json_object_get(o, "server");
        snprintf(sub, sizeof(sub), "%sserver.", prefix);
        /* The union's tag first: unknown members can only be judged once the variant is known. */
        json_t *t = json_object_get(server, "type");
        json_t *tonly = json_pack("{s:O}", "type", t ? t : json_null());
        if (!t) {
            vd_error_setg(errp, EINVAL, "Parameter '%stype' is missing", sub);
            r = -EINVAL;
        } else {
            r = qmp_args_check1(tonly, sub, sock_base_spec, errp);
        }
        json_decref(tonly);
        if (r < 0) {
            return r;
        }
        const char *type = qmp_arg_str(server, "type", "");
        const QmpArgSpec *vs = !strcmp(type, "inet") ? sock_inet_spec
                             : !strcmp(type, "unix") ? sock_unix_spec : NULL;
        if (!vs) {
            vd_error_setg(errp, ENOTSUP, "NBD server address type '%s' is not supported by "
                          "vdiskd (use inet or unix)", type);
            return -ENOTSUP;
        }
        const QmpArgSpec *const ss[] = {sock_base_spec, vs};
        if ((r = qmp_args_check(server, sub, ss, 2, errp)) < 0) {
            return r;
        }
    }
    /* Options vdiskd accepts in the schema but cannot honour: refuse rather than ignore. */
    if (json_object_get(o, "encrypt") || json_object_get(o, "data-file")) {
        vd_error_setg(errp, ENOTSUP, "'%s%s' is not supported by vdiskd", prefix,
                      json_object_get(o, "encrypt") ? "encrypt" : "data-file");
        return -ENOTSUP;
    }
    json_t *off = json_object_get(o, "offset"), *size = json_object_get(o, "size");
    if ((off && json_integer_value(off) != 0) || size) {
        vd_error_setg(errp, ENOTSUP, "'%s%s' of the raw driver is not supported by vdiskd",
                      prefix, size ? "size" : "offset");
        return -ENOTSUP;
    }
    const char *dz = qmp_arg_str(o, "detect-zeroes", "off");
    if (strcmp(dz, "off") != 0) {
        vd_error_setg(errp, ENOTSUP, "'%sdetect-zeroes': '%s' is not supported by vdiskd", prefix,
                      dz);
        return -ENOTSUP;
    }
    const char *const rbd_refused[] = {"key-secret", "auth-client-required", "server"};
    for (size_t i = 0; i < sizeof(rbd_refused) / sizeof(rbd_refused[0]); i++) {
        if (!strcmp(dname, "rbd") && json_object_get(o, rbd_refused[i])) {
            vd_error_setg(errp, ENOTSUP, "'%s%s' is not supported by vdiskd (name the cluster "
                          "and its keys in a Ceph configuration file: 'conf')", prefix,
                          rbd_refused[i]);
            return -ENOTSUP;
        }
    }
    if (json_object_get(o, "tls-creds")) {
        vd_error_setg(errp, ENOTSUP, "'%stls-creds': TLS is not supported by vdiskd", prefix);
        return -ENOTSUP;
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
    const char *children[] = {"file", "backing"};
    for (int i = 0; i < 2; i++) {
        json_t *c = json_object_get(o, children[i]);
        int r;
        if (json_is_object(c) && (r = check_names(c, seen, nseen, max, errp)) < 0) {
            return r;
        }
    }
    return 0;
}

/* ---- sharing: one host file, one writer (the block layer ignores this process's own locks) ---- */

typedef struct FileUse {
    dev_t dev;
    ino_t ino;
    bool writable;
    BlockNode *node; /* the format node using the file */
} FileUse;

typedef struct UseList {
    FileUse *v;
    size_t n, cap;
} UseList;

static bool host_file_id(BlockNode *file, dev_t *dev, ino_t *ino)
{
    struct stat st;
    if (!file || !file->drv || strcmp(file->drv->name, "file") != 0 || !file->filename ||
        stat(file->filename, &st) < 0) {
        return false;
    }
    *dev = st.st_dev;
    *ino = st.st_ino;
    return true;
}

static void uses_add(UseList *l, BlockNode *bs, int depth)
{
    for (; bs && depth < 4096; bs = bs->backing, depth++) {
        if (bs->file) {
            dev_t dev;
            ino_t ino;
            bool seen = false;
            for (size_t i = 0; i < l->n && !seen; i++) {
                seen = l->v[i].node == bs;
            }
            if (!seen && !(bs->open_flags & VD_OPEN_FORCE_SHARE) &&
                host_file_id(bs->file, &dev, &ino)) {
                if (l->n == l->cap) {
                    size_t nc = l->cap ? l->cap * 2 : 16;
                    FileUse *n = realloc(l->v, nc * sizeof(*n));
                    if (!n) {
                        return; /* best effort: the check is a guard, not the source of truth */
                    }
                    l->v = n;
                    l->cap = nc;
                }
                l->v[l->n++] = (FileUse){dev, ino, !bs->read_only, bs};
            }
            uses_add(l, bs->file, depth + 1);
        }
    }
}

/*
 * Refuse a format node (or a whole new tree) that would share a host file with another format
 * node of the daemon when either writes: two qcow2 nodes on one file corrupt each other's
 * metadata, and writing under a live backing file changes what its overlays read. QEMU refuses
 * these with its permission system ("Failed to get "write" lock").
 */
static int check_sharing(BlockNode *candidate, BlockNode *file_of_new, bool new_writable,
                         VdError **errp)
{
    UseList have = {0}, add = {0};
    for (size_t i = 0; i < nroots; i++) {
        uses_add(&have, roots[i], 0);
    }
    if (candidate) {
        uses_add(&add, candidate, 0);
    } else {
        dev_t dev;
        ino_t ino;
        if (host_file_id(file_of_new, &dev, &ino)) {
            add.v = malloc(sizeof(*add.v));
            if (add.v) {
                add.v[0] = (FileUse){dev, ino, new_writable, NULL};
                add.n = 1;
            }
        }
    }
    int r = 0;
    for (size_t i = 0; i < add.n && !r; i++) {
        for (size_t k = 0; k < have.n && !r; k++) {
            FileUse *a = &add.v[i], *h = &have.v[k];
            if (a->node == h->node || a->dev != h->dev || a->ino != h->ino ||
                (!a->writable && !h->writable)) {
                continue;
            }
            vd_error_setg(errp, EBUSY, "Failed to get %s\"write\" lock: '%s' is in use by "
                          "node '%s'", a->writable ? "" : "shared ",
                          h->node->file->filename, h->node->node_name ? h->node->node_name
                                                                      : "");
            r = -EBUSY;
        }
    }
    free(have.v);
    free(add.v);
    return r;
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

/* The libnbd URI of a blockdev-add nbd node: percent-encoded by nbd.c, so any export name works. */
static char *nbd_uri(json_t *o, VdError **errp)
{
    json_t *server = json_object_get(o, "server");
    bool is_unix = !strcmp(qmp_arg_str(server, "type", ""), "unix");
    const char *exp = qmp_arg_str(o, "export", "");
    const char *port = is_unix ? NULL : qmp_arg_str(server, "port", "");
    char *uri = is_unix ? vd_nbd_make_uri(NULL, NULL, qmp_arg_str(server, "path", ""), exp)
                        : vd_nbd_make_uri(qmp_arg_str(server, "host", ""), port, NULL, exp);
    if (!uri) {
        if (errno == EINVAL) {
            vd_error_setg(errp, EINVAL, "NBD server: invalid %s", is_unix ? "socket path"
                          : "host or port");
        } else {
            vd_error_setg(errp, ENOMEM, "Out of memory");
        }
    }
    return uri;
}

/* The QEMU-style filename of a blockdev-add rbd node (rbd.c escapes the parts). */
static char *rbd_filename(json_t *o, VdError **errp)
{
    char *name = vd_rbd_make_filename(qmp_arg_str(o, "pool", ""),
                                      qmp_arg_str(o, "namespace", NULL),
                                      qmp_arg_str(o, "image", ""),
                                      qmp_arg_str(o, "snapshot", NULL),
                                      qmp_arg_str(o, "conf", NULL), qmp_arg_str(o, "user", NULL));
    if (!name) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    return name;
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

    if (!strcmp(drv, "file")) {
        opts.filename = qmp_arg_str(o, "filename", "");
        opts.format = "file";
        return vd_open(&opts, errp);
    }
    if (!strcmp(drv, "nbd")) {
        if (!vd_find_driver("nbd")) {
            vd_error_setg(errp, ENOTSUP, "The nbd block driver (NBD client) is not available in "
                          "this build of vdiskd");
            return NULL;
        }
        return open_by_name(&opts, "nbd", nbd_uri(o, errp), errp);
    }

    if (!strcmp(drv, "rbd")) {
        return open_by_name(&opts, "rbd", rbd_filename(o, errp), errp);
    }

    /* Format drivers: raw, qcow2. */
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
    json_t *bref = json_object_get(o, "backing");
    if (json_is_null(bref)) {
        opts.flags |= VD_OPEN_NO_BACKING;
    } else if (bref) {
        backing = child_node(bref, &inh, true, errp);
        if (!backing) {
            vd_error_prepend(errp, "Could not open backing file: ");
            vd_node_unref(file);
            return NULL;
        }
    }
    /* Before opening: a read-write qcow2 open may already write (dirty flag, repairs). */
    if (!(inh.force_share) && check_sharing(NULL, file, !inh.read_only, errp) < 0) {
        vd_node_unref(file);
        vd_node_unref(backing);
        return NULL;
    }
    opts.format = drv;
    opts.file = file;
    opts.backing = backing;
    opts.snapshot = qmp_arg_str(o, "snapshot", NULL);
    if (opts.snapshot && !inh.read_only) {
        vd_error_setg(errp, EINVAL, "'snapshot' (an internal snapshot) can only be opened with "
                      "read-only=true");
        vd_node_unref(file);
        vd_node_unref(backing);
        return NULL;
    }
    BlockNode *bs = vd_open(&opts, errp);
    /* vd_open took its own references on file and backing. */
    vd_node_unref(file);
    vd_node_unref(backing);
    return bs;
}

BlockNode *graph_blockdev_add(json_t *options, VdError **errp)
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
    /* The whole new tree, backing files opened from image headers included. */
    if (check_sharing(bs, NULL, false, errp) < 0) {
        vd_node_unref(bs);
        return NULL;
    }
    if (roots_append(bs, errp) < 0) {
        vd_node_unref(bs);
        return NULL;
    }
    return bs; /* the registry owns the reference vd_open returned */
}

/* Who holds bs as a child? Sets *parent and whether it is the backing link. */
static bool find_parent(BlockNode *bs, BlockNode **parent, bool *as_backing)
{
    for (size_t i = 0; i < nroots; i++) {
        /* Walk each root's tree iteratively over backing, recursively over file. */
        BlockNode *stack[64];
        int sp = 0;
        stack[sp++] = roots[i];
        while (sp > 0) {
            BlockNode *n = stack[--sp];
            for (int depth = 0; n && depth < 4096; depth++) {
                if (n->backing == bs || n->file == bs) {
                    *parent = n;
                    *as_backing = n->backing == bs;
                    return true;
                }
                if (n->file && sp < 64) {
                    stack[sp++] = n->file;
                }
                n = n->backing;
            }
        }
    }
    return false;
}

int graph_blockdev_del(const char *node_name, VdError **errp)
{
    BlockNode *bs = graph_find_node(node_name);
    ssize_t idx = bs ? root_index(bs) : -1;
    if (!bs) {
        /* ENXIO: neither ENOENT nor ENODEV, which the QMP server reports as other classes. */
        vd_error_setg(errp, ENXIO, "Failed to find node with node-name='%s'",
                      node_name ? node_name : "");
        return -ENXIO;
    }
    if (idx < 0) {
        vd_error_setg(errp, EINVAL, "Node %s is not owned by the monitor", node_name);
        return -EINVAL;
    }
    BlockNode *parent = NULL;
    bool as_backing = false;
    if (find_parent(bs, &parent, &as_backing)) {
        if (as_backing) {
            vd_error_setg(errp, EBUSY, "Node '%s' is busy: node is used as backing hd of '%s'",
                          node_name, parent->node_name ? parent->node_name : "");
        } else {
            vd_error_setg(errp, EBUSY, "Block device %s is in use", node_name);
        }
        return -EBUSY;
    }
    if (__atomic_load_n(&bs->refcnt, __ATOMIC_ACQUIRE) > 1) {
        vd_error_setg(errp, EBUSY, "Node '%s' is busy: node is in use by an export or a job",
                      node_name);
        return -EBUSY;
    }
    root_remove((size_t)idx);
    return 0;
}

int graph_unregister(BlockNode *node)
{
    ssize_t idx = node ? root_index(node) : -1;
    if (idx < 0) {
        return -ENOENT;
    }
    BlockNode *parent = NULL;
    bool as_backing = false;
    if (find_parent(node, &parent, &as_backing)) {
        return -EBUSY; /* still reachable (and named) through another node: keep it */
    }
    root_remove((size_t)idx);
    return 0;
}

void graph_drop_implicit(BlockNode *node)
{
    if (node && implicit_index(node) >= 0) {
        graph_unregister(node);
    }
}

BlockNode *graph_backing_parent(BlockNode *bs)
{
    BlockNode *parent = NULL;
    bool as_backing = false;
    return bs && find_parent(bs, &parent, &as_backing) && as_backing ? parent : NULL;
}
