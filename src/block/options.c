/*
 * options.c - images named by option trees instead of file names, as QEMU's bdrv_open takes them:
 * "json:{...}" pseudo-filenames (anywhere a filename goes, backing names included) and
 * --image-opts "key=value,file.key=value" strings. Dotted keys nest ("file.filename" is
 * {"file": {"filename": ...}}); values may be JSON-typed or strings ("on", "1048576"). Each node's
 * keys are checked against the common ones and its driver's blockdev_options before it opens.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "block/block.h"
#include "util/qjson.h"

/* json: trees inside json: backing names inside ... stop somewhere. */
#define MAX_TREE_DEPTH 16

static __thread int tree_depth;

/* Set key (dotted: nested objects, created on the way) to v in o; takes v's reference. */
static int set_dotted(json_t *o, const char *key, json_t *v, VdError **errp)
{
    const char *dot;
    while ((dot = strchr(key, '.'))) {
        char *part = strndup(key, (size_t)(dot - key));
        if (!part) {
            json_decref(v);
            vd_error_setg(errp, ENOMEM, "Out of memory");
            return -ENOMEM;
        }
        json_t *child = json_object_get(o, part);
        if (!child) {
            child = json_object();
            json_object_set_new(o, part, child);
        }
        free(part);
        if (!json_is_object(child)) {
            json_decref(v);
            vd_error_setg(errp, EINVAL, "Option '%s' is both a value and an object", key);
            return -EINVAL;
        }
        o = child;
        key = dot + 1;
    }
    if (json_object_get(o, key) && json_is_object(json_object_get(o, key)) != json_is_object(v)) {
        json_decref(v);
        vd_error_setg(errp, EINVAL, "Option '%s' is both a value and an object", key);
        return -EINVAL;
    }
    return json_object_set_new(o, key, v) == 0 ? 0 : -ENOMEM;
}

/* Nest the dotted keys of o (recursively), as QEMU's qdict_crumple; a new reference. */
static json_t *crumple(json_t *o, VdError **errp)
{
    json_t *out = json_object();
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        json_t *nv = json_is_object(v) ? crumple(v, errp) : json_incref(v);
        if (!nv || set_dotted(out, key, nv, errp) < 0) {
            json_decref(out);
            return NULL;
        }
    }
    return out;
}

json_t *vd_options_parse_json(const char *filename, VdError **errp)
{
    json_error_t jerr;
    json_t *o = json_loads(filename + 5, JSON_DECODE_ANY, &jerr);
    if (!o) {
        vd_error_setg(errp, EINVAL, "Could not parse the JSON options: %s", jerr.text);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        vd_error_setg(errp, EINVAL, "Invalid JSON object given");
        return NULL;
    }
    json_t *c = crumple(o, errp);
    json_decref(o);
    return c;
}

json_t *vd_options_parse_keyval(const char *s, VdError **errp)
{
    json_t *o = json_object();
    char *buf = malloc(strlen(s) + 1);
    if (!o || !buf) {
        json_decref(o);
        free(buf);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    const char *p = s;
    while (*p) {
        /* one item up to an unescaped comma; ",," is a literal comma */
        size_t n = 0;
        while (*p && !(*p == ',' && p[1] != ',')) {
            buf[n++] = *p;
            p += *p == ',' ? 2 : 1;
        }
        buf[n] = '\0';
        if (*p == ',') {
            p++;
        }
        char *eq = strchr(buf, '=');
        if (!eq || eq == buf) {
            vd_error_setg(errp, EINVAL, "Invalid parameter '%s'", buf);
            goto fail;
        }
        *eq = '\0';
        if (set_dotted(o, buf, json_string(eq + 1), errp) < 0) {
            goto fail;
        }
    }
    free(buf);
    return o;
fail:
    free(buf);
    json_decref(o);
    return NULL;
}

const char *vd_options_str(json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

int vd_options_bool(json_t *o, const char *key, bool *out, VdError **errp)
{
    json_t *v = json_object_get(o, key);
    const char *s = json_string_value(v);
    if (!v) {
        return 0;
    }
    if (json_is_boolean(v)) {
        *out = json_is_true(v);
    } else if (s && (!strcmp(s, "on") || !strcmp(s, "true") || !strcmp(s, "yes"))) {
        *out = true;
    } else if (s && (!strcmp(s, "off") || !strcmp(s, "false") || !strcmp(s, "no"))) {
        *out = false;
    } else {
        vd_error_setg(errp, EINVAL, "Parameter '%s' expects 'on' or 'off'", key);
        return -EINVAL;
    }
    return 0;
}

int vd_options_u64(json_t *o, const char *key, uint64_t *out, VdError **errp)
{
    json_t *v = json_object_get(o, key);
    const char *s = json_string_value(v);
    if (!v) {
        return 0;
    }
    if (json_is_integer(v) && json_integer_value(v) >= 0) {
        *out = (uint64_t)json_integer_value(v);
        return 0;
    }
    if (s && *s >= '0' && *s <= '9') {
        char *end;
        errno = 0;
        unsigned long long n = strtoull(s, &end, 0);
        uint64_t mul = 1;
        switch (*end) {
        case 'k': case 'K': mul = 1ULL << 10; end++; break;
        case 'M': mul = 1ULL << 20; end++; break;
        case 'G': mul = 1ULL << 30; end++; break;
        case 'T': mul = 1ULL << 40; end++; break;
        default: break;
        }
        if (!errno && !*end && n <= UINT64_MAX / mul) {
            *out = n * mul;
            return 0;
        }
    }
    vd_error_setg(errp, EINVAL, "Parameter '%s' expects a non-negative number", key);
    return -EINVAL;
}

/* Members every node takes (BlockdevOptions' base), beside "driver". */
static const char *const common_keys[] = {
    "driver", "node-name", "read-only", "auto-read-only", "force-share", "cache", "discard",
    "detect-zeroes", NULL
};

static bool spec_has(const VdOptSpec *spec, const char *key)
{
    for (; spec && spec->name; spec++) {
        if (!strcmp(spec->name, key)) {
            return true;
        }
    }
    return false;
}

int vd_options_check_keys(json_t *o, const BlockDriver *drv, VdError **errp)
{
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        bool ok = spec_has(drv->blockdev_options, key) ||
                  (!strcmp(key, "filename") && drv->is_protocol);
        for (int i = 0; !ok && common_keys[i]; i++) {
            ok = !strcmp(common_keys[i], key);
        }
        if (!ok) {
            /* QEMU's two wordings (bdrv_open_inherit) */
            vd_error_setg(errp, EINVAL, drv->is_protocol
                              ? "Block protocol '%s' doesn't support the option '%s'"
                              : "Block format '%s' does not support the option '%s'",
                          drv->name, key);
            return -EINVAL;
        }
    }
    return 0;
}

/* The open flags a node's own options ask for, from its parent's. */
static int node_flags(json_t *o, int flags, VdError **errp)
{
    bool ro = !(flags & VD_OPEN_RDWR), direct = (flags & VD_OPEN_DIRECT) != 0;
    bool no_flush = (flags & VD_OPEN_NO_FLUSH) != 0, share = (flags & VD_OPEN_FORCE_SHARE) != 0;
    json_t *cache = json_object_get(o, "cache");
    if (vd_options_bool(o, "read-only", &ro, errp) < 0 ||
        vd_options_bool(o, "force-share", &share, errp) < 0 ||
        vd_options_bool(cache, "direct", &direct, errp) < 0 ||
        vd_options_bool(cache, "no-flush", &no_flush, errp) < 0) {
        return -EINVAL;
    }
    if (share && !ro) {
        vd_error_setg(errp, EINVAL, "force-share=on can only be used with read-only images");
        return -EINVAL;
    }
    flags &= ~(VD_OPEN_RDWR | VD_OPEN_DIRECT | VD_OPEN_NO_FLUSH | VD_OPEN_FORCE_SHARE);
    return flags | (ro ? 0 : VD_OPEN_RDWR) | (direct ? VD_OPEN_DIRECT : 0) |
           (no_flush ? VD_OPEN_NO_FLUSH : 0) | (share ? VD_OPEN_FORCE_SHARE : 0);
}

/*
 * A json: name's tree read back so that it prints as it was printed: QEMU's writer lists keys
 * of one QDict bucket newest first, so each object's members are inserted in reverse.
 */
static json_t *reinsert_reversed(json_t *v)
{
    if (!json_is_object(v)) {
        return json_incref(v);
    }
    size_t n = json_object_size(v), i = 0;
    const char **keys = calloc(n ? n : 1, sizeof(*keys));
    json_t *out = keys ? json_object() : NULL, *m;
    const char *k;
    json_object_foreach(out ? v : NULL, k, m) {
        keys[i++] = k;
    }
    while (out && i > 0) {
        i--;
        if (json_object_set_new(out, keys[i], reinsert_reversed(json_object_get(v, keys[i])))) {
            json_decref(out);
            out = NULL;
        }
    }
    free(keys);
    return out;
}

/*
 * QEMU's name for a node its options describe (bdrv_refresh_filename): "json:" and the driver
 * with the options that name it - drv's json_name_options present in o, or (child given) the
 * "file" child's own json: name. NULL when neither applies (the URI or file name stands);
 * a new string, or NULL with *errp set out of memory.
 */
char *vd_json_node_name(const BlockDriver *drv, json_t *o, const BlockNode *child,
                        bool *failed)
{
    json_t *name = NULL;
    *failed = false;
    bool own = false; /* a format given options that name it (raw's offset, size) */
    for (const char *const *k = drv->json_name_options; child && k && *k; k++) {
        own |= json_object_get(o, *k) != NULL;
    }
    if (child && (own || !strncmp(child->filename, "json:", 5))) {
        json_t *c;
        if (!strncmp(child->filename, "json:", 5)) {
            json_t *parsed = json_loads(child->filename + 5, 0, NULL);
            c = parsed ? reinsert_reversed(parsed) : NULL;
            json_decref(parsed);
        } else {
            c = json_pack("{s:s, s:s}", "driver", child->drv->name, "filename", child->filename);
        }
        name = c ? json_pack("{s:s}", "driver", drv->name) : NULL;
        for (const char *const *k = drv->json_name_options; name && k && *k; k++) {
            json_t *v = json_object_get(o, *k);
            if (v) {
                json_object_set(name, *k, v);
            }
        }
        if (name) {
            json_object_set(name, "file", c);
        }
        json_decref(c);
    } else {
        for (const char *const *k = drv->json_name_options; k && *k; k++) {
            json_t *v = json_object_get(o, *k);
            if (v && !name && !(name = json_pack("{s:s}", "driver", drv->name))) {
                break;
            }
            if (v) {
                json_object_set(name, *k, v);
            }
        }
        if (!name) {
            return NULL;
        }
    }
    char *text = name ? vd_qjson_compact(name) : NULL;
    json_decref(name);
    char *out = NULL;
    if (!text || asprintf(&out, "json:%s", text) < 0) {
        out = NULL;
        *failed = true;
    }
    free(text);
    return out;
}

static json_t *json_reader_get(const VdOptReader *r, const char *path)
{
    json_t *v = ((const VdJsonOptReader *)r)->obj;
    char key[256];
    while (v && *path) {
        const char *dot = strchr(path, '.');
        size_t n = dot ? (size_t)(dot - path) : strlen(path);
        if (n >= sizeof(key)) {
            return NULL;
        }
        memcpy(key, path, n);
        key[n] = '\0';
        v = json_object_get(v, key);
        path += dot ? n + 1 : n;
    }
    return v;
}

static const char *json_reader_str(const VdOptReader *r, const char *path)
{
    json_t *v = json_reader_get(r, path);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* A number, or (--image-opts' keyval has only strings) its decimal digits. */
static bool json_reader_num(const VdOptReader *r, const char *path, unsigned long long *out)
{
    json_t *v = json_reader_get(r, path);
    if (json_is_string(v)) {
        const char *t = json_string_value(v);
        char *end;
        errno = 0;
        unsigned long long n = strtoull(t, &end, 10);
        if (!*t || *end || errno || *t == '-') {
            return false;
        }
        *out = n;
        return true;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0) {
        return false;
    }
    *out = (unsigned long long)json_integer_value(v);
    return true;
}

void vd_json_opt_reader_init(VdJsonOptReader *jr, json_t *obj)
{
    jr->r.str = json_reader_str;
    jr->r.num = json_reader_num;
    jr->obj = obj;
}

static BlockNode *open_tree(json_t *o, int flags, bool protocol, VdError **errp);

/* A protocol node for a file name: the protocol it names (path: file, nbd://: nbd ...). */
BlockNode *vd_open_protocol(const char *filename, int flags, VdError **errp)
{
    const BlockDriver *p = vd_protocol_for(filename, errp);
    return p ? vd_open_image(filename, p->name, flags, errp) : NULL;
}

/*
 * A child given as an object (a tree) or a string (a file name). protocol: a "file" child, so a
 * file name or a driver-less object opens the protocol node only, as QEMU's; backing is an image.
 */
static BlockNode *open_child(json_t *ref, const char *what, int flags, bool protocol,
                             VdError **errp)
{
    if (json_is_string(ref)) {
        const char *name = json_string_value(ref);
        return protocol ? vd_open_protocol(name, flags, errp)
                        : vd_open_image(name, NULL, flags, errp);
    }
    if (json_is_object(ref)) {
        return open_tree(ref, flags, protocol, errp);
    }
    vd_error_setg(errp, EINVAL, "'%s' must be an object or a file name", what);
    return NULL;
}

/* A format node (drv NULL: probed) over its "file" child, maybe with a "backing" one. */
static BlockNode *open_tree_format(json_t *o, const BlockDriver *drv, int flags, VdError **errp)
{
    json_t *fref = json_object_get(o, "file");
    if (!fref) {
        vd_error_setg(errp, EINVAL, "A block device must be specified for \"file\"");
        return NULL;
    }
    BlockNode *file = open_child(fref, "file", flags & ~(VD_OPEN_NO_BACKING | VD_OPEN_WRITETHROUGH),
                                 true, errp);
    if (!file) {
        return NULL;
    }
    VdOpenOptions opts = {
        .format = drv ? drv->name : NULL, .flags = flags, .file = file, .options = o,
        .node_name = vd_options_str(o, "node-name"), .snapshot = vd_options_str(o, "snapshot"),
        /* luks: key-secret; qcow2: encrypt.key-secret (the secret object's id) */
        .key_secret = vd_options_str(o, "key-secret")
                          ? vd_options_str(o, "key-secret")
                          : vd_options_str(json_object_get(o, "encrypt"), "key-secret"),
    };
    json_t *dref = json_object_get(o, "data-file");
    if (dref && !(opts.data_file = open_child(dref, "data-file",
                                              flags & ~(VD_OPEN_NO_BACKING | VD_OPEN_WRITETHROUGH),
                                              true, errp))) {
        vd_node_unref(file);
        return NULL;
    }
    json_t *bref = json_object_get(o, "backing");
    if (bref && !json_is_null(bref) && (flags & VD_OPEN_NO_BACKING)) {
        /* QEMU: an open without the backing chain leaves backing.* unused, which it refuses */
        char *key = strdup("backing");
        for (json_t *v = bref; key && json_is_object(v) && json_object_size(v);) {
            const char *k = json_object_iter_key(json_object_iter(v));
            char *longer = NULL;
            if (asprintf(&longer, "%s.%s", key, k) < 0) {
                longer = NULL;
            }
            free(key);
            key = longer;
            v = json_object_get(v, k);
        }
        vd_error_setg(errp, EINVAL, "Block format '%s' does not support the option '%s'",
                      drv ? drv->name : vd_options_str(o, "driver"), key ? key : "backing");
        free(key);
        vd_node_unref(file);
        vd_node_unref(opts.data_file);
        return NULL;
    }
    if (json_is_null(bref)) {
        opts.flags |= VD_OPEN_NO_BACKING;
    } else if (json_is_object(bref) && !json_object_get(bref, "filename") &&
               (!json_object_get(bref, "file") ||
                (json_is_object(json_object_get(bref, "file")) &&
                 !json_object_get(json_object_get(bref, "file"), "filename")))) {
        /* options for the backing the image names (its "driver" overrides the recorded format,
           "file.*" are its protocol node's) */
        opts.backing_options = bref;
    } else if (bref && !(opts.backing = open_child(bref, "backing", flags & ~VD_OPEN_RDWR,
                                                    false, errp))) {
        vd_error_prepend(errp, "Could not open backing file: ");
        vd_node_unref(file);
        vd_node_unref(opts.data_file);
        return NULL;
    }
    BlockNode *bs = vd_open(&opts, errp);
    bool failed = false;
    char *name = bs ? vd_json_node_name(bs->drv, o, file, &failed) : NULL;
    if (name) { /* over a child QEMU names by its options, the node is named by them too */
        free(bs->filename);
        bs->filename = name;
    } else if (failed) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        vd_node_unref(bs);
        bs = NULL;
    }
    vd_node_unref(file);
    vd_node_unref(opts.data_file);
    vd_node_unref(opts.backing);
    return bs;
}

static BlockNode *open_tree(json_t *o, int flags, bool protocol, VdError **errp)
{
    const char *driver = vd_options_str(o, "driver");
    const char *filename = vd_options_str(o, "filename");
    const BlockDriver *drv = driver ? vd_find_driver(driver) : NULL;
    if (driver && !drv) {
        vd_error_setg(errp, EINVAL, "Unknown driver '%s'", driver);
        return NULL;
    }
    if (!drv && protocol && filename && json_object_size(o) > 1 &&
        !(drv = vd_protocol_for(filename, errp))) {
        return NULL; /* {"filename": F, ...}: the options are F's protocol's, checked as such */
    }
    if (++tree_depth > MAX_TREE_DEPTH) {
        tree_depth--;
        vd_error_setg(errp, ELOOP, "Options nested too deeply (json: inside json:?)");
        return NULL;
    }
    BlockNode *bs = NULL;
    flags = node_flags(o, flags, errp);
    if (flags < 0 || (drv && drv->legacy_options && drv->legacy_options(o, errp) < 0) ||
        (drv && vd_options_check_keys(o, drv, errp) < 0)) {
        goto out;
    }
    if (!drv && !json_object_get(o, "file")) {
        /* {"filename": F}: F's protocol and format as if named on the command line */
        if (!filename) {
            vd_error_setg(errp, EINVAL, "The options name no driver and no filename");
            goto out;
        }
        bs = protocol ? vd_open_protocol(filename, flags, errp)
                      : vd_open_image(filename, NULL, flags, errp);
    } else if (drv && drv->is_protocol) {
        /* a protocol named without a filename: its URI ("null-co://") or its name */
        bool failed;
        if (!strcmp(drv->name, "blkdebug") && vd_blkdebug_order_rules(o, false) < 0) {
            vd_error_setg(errp, ENOMEM, "Out of memory");
            goto out;
        }
        char *uri = NULL;
        if (!filename && drv->blockdev_filename) {
            /* nbd's server.* and export, as blockdev-add gives them */
            VdJsonOptReader jr;
            vd_json_opt_reader_init(&jr, o);
            if (!(uri = drv->blockdev_filename(&jr.r, errp))) {
                goto out;
            }
        } else {
            uri = vd_json_node_name(drv, o, NULL, &failed);
            if (failed || (!uri && !filename && drv->uri_schemes &&
                           asprintf(&uri, "%s://", drv->uri_schemes[0]) < 0)) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                goto out;
            }
        }
        VdOpenOptions po = { .filename = uri ? uri : filename ? filename : drv->name,
                             .format = drv->name,
                             .flags = flags, .options = o,
                             .tls_creds = vd_options_str(o, "tls-creds"),
                             .node_name = vd_options_str(o, "node-name") };
        bs = vd_open(&po, errp);
        free(uri);
    } else {
        bs = open_tree_format(o, drv, flags, errp); /* no driver: the file child is probed */
    }
out:
    tree_depth--;
    return bs;
}

BlockNode *vd_open_options(json_t *options, int flags, bool protocol, VdError **errp)
{
    return open_tree(options, flags, protocol, errp);
}

BlockNode *vd_open_json(const char *filename, const char *format, int flags, VdError **errp)
{
    json_t *o = vd_options_parse_json(filename, errp);
    if (!o) {
        return NULL;
    }
    if (format && !json_object_get(o, "driver")) {
        json_object_set_new(o, "driver", json_string(format));
    }
    BlockNode *bs = open_tree(o, flags, false, errp);
    json_decref(o);
    return bs;
}
