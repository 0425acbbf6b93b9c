/*
 * blkdebug.c - QEMU's blkdebug fault-injection driver: a protocol node over an `image` child that
 * fails chosen requests with a chosen errno, so error paths can be driven from the command line
 * ("blkdebug:RULES.cfg:IMAGE", or json:/--image-opts with "image", "config", "inject-error",
 * "set-state"). Rules as QEMU's: an event activates the inject-error rules of the current state,
 * set-state rules move the state (it starts at 1), an active rule fails every request whose range
 * holds the start of its sector (-1: any) until, with once, it fired once. Events come from the
 * format above (block.h's debug_event): read_aio, write_aio, pwritev_zero, flush_to_os,
 * flush_to_disk; QEMU's format-internal events (l2_load, ...) are refused by name.
 * Rules are guarded by one mutex; requests themselves run in parallel on the child.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "block/block.h"
#include "block/graph.h"
#include "util/lock.h"
#include "util/qjson.h"

typedef int Event; /* VD_DEBUG_* */

static const char *const event_names[VD_DEBUG_N] = {
    [VD_DEBUG_READ_AIO] = "read_aio", [VD_DEBUG_WRITE_AIO] = "write_aio",
    [VD_DEBUG_PWRITEV_ZERO] = "pwritev_zero", [VD_DEBUG_FLUSH_TO_OS] = "flush_to_os",
    [VD_DEBUG_FLUSH_TO_DISK] = "flush_to_disk",
};

typedef struct Rule {
    bool inject;       /* inject-error, else set-state */
    Event event;
    int64_t state;     /* 0: any state */
    int64_t new_state; /* set-state */
    int err;           /* inject-error: positive errno */
    int64_t sector;    /* -1: any */
    bool once;
    bool active;
    bool spent;        /* a once rule that fired */
} Rule;

/* The image is bs->file (QEMU's blkdebug: its "image" child), so graph walkers see the link. */
typedef struct BlkdebugState {
    pthread_mutex_t lock;
    Rule *rules;
    size_t n;
    int64_t state;
} BlkdebugState;

static int event_parse(const char *name, Event *ev, VdError **errp)
{
    for (int i = 0; i < VD_DEBUG_N; i++) {
        if (name && !strcmp(event_names[i], name)) {
            *ev = i;
            return 0;
        }
    }
    vd_error_setg(errp, EINVAL, "invalid parameter value: %s (vdisk's blkdebug knows read_aio, "
                  "write_aio, pwritev_zero, flush_to_os, flush_to_disk)",
                  name ? name : "(none)");
    return -EINVAL;
}

static int64_t get_int(json_t *o, const char *key, int64_t dflt, int *ret, VdError **errp)
{
    json_t *v = json_object_get(o, key);
    const char *s = json_string_value(v);
    if (!v || *ret < 0) {
        return dflt;
    }
    if (json_is_integer(v)) {
        return json_integer_value(v);
    }
    char *end;
    long long n = s ? strtoll(s, &end, 0) : 0;
    if (!s || !*s || *end) {
        vd_error_setg(errp, EINVAL, "Parameter '%s' expects a number", key);
        *ret = -EINVAL;
        return dflt;
    }
    return n;
}

/* One rule from its option object (JSON-typed or string values, as the config file gives). */
static int rule_add(BlkdebugState *s, json_t *o, bool inject, VdError **errp)
{
    if (!json_is_object(o)) {
        vd_error_setg(errp, EINVAL, "A blkdebug rule must be an object");
        return -EINVAL;
    }
    Rule r = { .inject = inject, .sector = -1, .err = EIO };
    int ret = event_parse(vd_options_str(o, "event"), &r.event, errp);
    bool immediately = false;
    r.state = get_int(o, "state", 0, &ret, errp);
    if (inject) {
        r.err = (int)get_int(o, "errno", EIO, &ret, errp);
        r.sector = get_int(o, "sector", -1, &ret, errp);
        if (ret == 0) {
            ret = vd_options_bool(o, "once", &r.once, errp);
        }
        if (ret == 0) {
            /* QEMU: fail in the request itself rather than after a yield; here always so */
            ret = vd_options_bool(o, "immediately", &immediately, errp);
        }
    } else {
        r.new_state = get_int(o, "new_state", 0, &ret, errp);
        if (ret == 0 && !json_object_get(o, "new_state")) {
            vd_error_setg(errp, EINVAL, "set-state needs new_state");
            ret = -EINVAL;
        }
    }
    if (ret == 0 && (r.err <= 0 || r.err > 4095)) {
        vd_error_setg(errp, EINVAL, "Parameter 'errno' expects a positive errno value");
        ret = -EINVAL;
    }
    if (ret < 0) {
        return ret;
    }
    Rule *n = realloc(s->rules, (s->n + 1) * sizeof(*n));
    if (!n) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    s->rules = n;
    s->rules[s->n++] = r;
    return 0;
}

static int rules_add_array(BlkdebugState *s, json_t *arr, bool inject, VdError **errp)
{
    if (!arr) {
        return 0;
    }
    if (json_is_object(arr) && json_object_get(arr, "0")) {
        /* --image-opts: inject-error.0.event=...,inject-error.1.event=... (QEMU's list form) */
        char key[24];
        json_t *o;
        int ret = 0;
        for (size_t i = 0; ret == 0 && (snprintf(key, sizeof(key), "%zu", i),
                                        o = json_object_get(arr, key)); i++) {
            ret = rule_add(s, o, inject, errp);
        }
        return ret;
    }
    if (json_is_object(arr)) {
        return rule_add(s, arr, inject, errp); /* --image-opts: inject-error.event=... */
    }
    size_t i;
    json_t *o;
    json_array_foreach(arr, i, o) {
        int ret = rule_add(s, o, inject, errp);
        if (ret < 0) {
            return ret;
        }
    }
    return json_is_array(arr) ? 0 : -EINVAL;
}

/*
 * QEMU's config file: "[inject-error]" / "[set-state]" sections of `key = "value"` lines
 * ('#' comments). Each section is one rule.
 */
static int read_config(BlkdebugState *s, const char *path, VdError **errp)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        int e = errno;
        vd_error_setg_errno(errp, e, "Could not read blkdebug config file");
        return -e;
    }
    char line[1024];
    json_t *cur = NULL;
    bool inject = false;
    int ret = 0;
    while (ret == 0 && fgets(line, sizeof(line), f)) {
        char *p = line + strspn(line, " \t");
        p[strcspn(p, "\r\n")] = '\0';
        if (!*p || *p == '#') {
            continue;
        }
        if (*p == '[') {
            if (cur) {
                ret = rule_add(s, cur, inject, errp);
                json_decref(cur);
                cur = NULL;
            }
            if (ret == 0 && (!strcmp(p, "[inject-error]") || !strcmp(p, "[set-state]"))) {
                inject = p[1] == 'i';
                cur = json_object();
            } else if (ret == 0) {
                vd_error_setg(errp, EINVAL, "blkdebug config: unknown section %s", p);
                ret = -EINVAL;
            }
            continue;
        }
        char *eq = strchr(p, '=');
        if (!cur || !eq) {
            vd_error_setg(errp, EINVAL, "blkdebug config: cannot parse '%s'", p);
            ret = -EINVAL;
            break;
        }
        char *k = p, *v = eq + 1, *ke = eq;
        while (ke > k && (ke[-1] == ' ' || ke[-1] == '\t')) {
            ke--;
        }
        *ke = '\0';
        v += strspn(v, " \t");
        size_t vl = strlen(v);
        while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t')) {
            v[--vl] = '\0';
        }
        if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') {
            v[vl - 1] = '\0';
            v++;
        }
        json_object_set_new(cur, k, json_string(v));
    }
    if (ret == 0 && cur) {
        ret = rule_add(s, cur, inject, errp);
    }
    json_decref(cur);
    fclose(f);
    return ret;
}

/* The options that name a blkdebug node by its options (QEMU's blkdebug_strong_runtime_opts). */
static const char *const strong_options[] = {
    "config", "inject-error", "set-state", "align", "max-transfer", "opt-write-zero",
    "max-write-zero", "opt-discard", "max-discard", NULL
};

int vd_blkdebug_order_rules(json_t *o, bool qapi)
{
    static const char *const order[] = {
        "event", "state", "iotype", "errno", "sector", "once", "immediately", "new_state", NULL
    };
    static const char *const lists[] = {"inject-error", "set-state", NULL};
    const size_t last = sizeof(order) / sizeof(order[0]) - 2;
    for (const char *const *l = lists; *l; l++) {
        json_t *arr = json_object_get(o, *l), *r;
        size_t i;
        char idx[24];
        /* a list, or --image-opts' {"0": {...}, "1": ...} */
        for (i = 0; (r = json_is_array(arr) ? json_array_get(arr, i)
                               : json_is_object(arr) ? (snprintf(idx, sizeof(idx), "%zu", i),
                                                        json_object_get(arr, idx))
                                                     : NULL); i++) {
            json_t *n = json_object();
            for (size_t j = 0; n && j <= last; j++) {
                const char *k = order[qapi ? last - j : j];
                json_t *v = json_object_get(r, k);
                if (v && json_object_set(n, k, v) < 0) {
                    json_decref(n);
                    n = NULL;
                }
            }
            const char *k;
            json_t *v;
            json_object_foreach(n ? r : NULL, k, v) { /* members blkdebug refuses later */
                if (!json_object_get(n, k) && json_object_set(n, k, v) < 0) {
                    json_decref(n);
                    n = NULL;
                    break;
                }
            }
            if (!n || (json_is_array(arr) ? json_array_set_new(arr, i, n)
                                          : json_object_set_new(arr, idx, n)) < 0) {
                return -ENOMEM;
            }
        }
    }
    return 0;
}

/* Add v under key to out as QEMU keeps options: nested objects and arrays as dotted keys. */
static int flatten_into(json_t *out, const char *key, json_t *v)
{
    if (json_is_object(v) || json_is_array(v)) {
        size_t n = json_is_array(v) ? json_array_size(v) : 0;
        const char *k;
        json_t *m;
        char *sub;
        for (size_t i = 0; i < n; i++) {
            if (asprintf(&sub, "%s.%zu", key, i) < 0) {
                return -ENOMEM;
            }
            int r = flatten_into(out, sub, json_array_get(v, i));
            free(sub);
            if (r < 0) {
                return r;
            }
        }
        json_object_foreach(json_is_object(v) ? v : NULL, k, m) {
            if (asprintf(&sub, "%s.%s", key, k) < 0) {
                return -ENOMEM;
            }
            int r = flatten_into(out, sub, m);
            free(sub);
            if (r < 0) {
                return r;
            }
        }
        return 0;
    }
    return json_object_set(out, key, v) < 0 ? -ENOMEM : 0;
}

/*
 * QEMU's name for the node (blkdebug_refresh_filename): "blkdebug:CONFIG:IMAGE" when only the
 * config file and the image name it, else json:{...} of the image's options, the driver and
 * the rule options flattened ("inject-error.0.event"). A new string, or NULL out of memory.
 */
static char *node_filename(json_t *o, const char *config, BlockNode *image)
{
    bool plain = strncmp(image->filename, "json:", 5) != 0;
    for (const char *const *k = strong_options + 1; *k && plain; k++) {
        plain = !json_object_get(o, *k);
    }
    char *out = NULL;
    if (plain) {
        return asprintf(&out, "blkdebug:%s:%s", config ? config : "", image->filename) < 0
                   ? NULL : out;
    }
    json_t *img = plain ? NULL : json_loads(image->filename + 5, 0, NULL);
    if (!img && strncmp(image->filename, "json:", 5)) {
        img = json_pack("{s:s, s:s}", "driver", image->drv->name, "filename", image->filename);
    }
    json_t *name = json_pack("{s:s}", "driver", "blkdebug");
    int r = img && name && json_object_set(name, "image", img) == 0 ? 0 : -ENOMEM;
    for (const char *const *k = strong_options; *k && r == 0; k++) {
        json_t *v = json_object_get(o, *k);
        r = v ? flatten_into(name, *k, v) : 0;
    }
    char *text = r == 0 ? vd_qjson_compact(name) : NULL;
    if (text && asprintf(&out, "json:%s", text) < 0) {
        out = NULL;
    }
    free(text);
    json_decref(img);
    json_decref(name);
    return out;
}

static int blkdebug_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    BlkdebugState *s = bs->opaque;
    json_t *o = opts->options;
    const char *config = vd_options_str(o, "config");
    int ret = 0;
    char *cfg_copy = NULL;
    pthread_mutex_init(&s->lock, NULL);
    s->state = 1;
    /* "blkdebug:CONFIG:IMAGE" (CONFIG may be empty) */
    const char *image_name = NULL;
    if (!strncmp(opts->filename, "blkdebug:", 9)) {
        const char *rest = opts->filename + 9;
        const char *colon = strchr(rest, ':');
        if (!colon) {
            vd_error_setg(errp, EINVAL, "Could not parse blkdebug filename '%s'", opts->filename);
            return -EINVAL;
        }
        if (colon > rest && !(config = cfg_copy = strndup(rest, (size_t)(colon - rest)))) {
            return -ENOMEM;
        }
        image_name = *(colon + 1) ? colon + 1 : NULL;
    }
    if (config) {
        ret = read_config(s, config, errp);
    }
    free(cfg_copy);
    if (ret == 0) {
        ret = rules_add_array(s, json_object_get(o, "inject-error"), true, errp);
    }
    if (ret == 0) {
        ret = rules_add_array(s, json_object_get(o, "set-state"), false, errp);
    }
    if (ret < 0) {
        free(s->rules);
        return ret;
    }
    json_t *img = json_object_get(o, "image");
    BlockNode *image = NULL;
    int flags = bs->open_flags & ~VD_OPEN_NO_BACKING;
    /* a node name (vdiskd's blockdev-add, as QSD): that node; elsewhere a string is a filename */
    BlockNode *named = json_is_string(img) ? graph_find_node(json_string_value(img)) : NULL;
    if (named && (flags & VD_OPEN_RDWR) && named->read_only) {
        vd_error_setg(errp, EACCES, "Block node '%s' is read-only: cannot open '%s' read-write "
                      "on it", json_string_value(img), opts->node_name ? opts->node_name
                                                                        : "blkdebug");
    } else if (named) {
        vd_node_ref(named);
        image = named;
    } else if (json_is_object(img)) {
        image = vd_open_options(img, flags, true, errp);
    } else if (json_is_string(img) || image_name) {
        const char *name = image_name ? image_name : json_string_value(img);
        image = vd_open_protocol(name, flags, errp);
    } else {
        vd_error_setg(errp, EINVAL, "A block device must be specified for \"image\"");
    }
    if (!image) {
        free(s->rules);
        return -EINVAL;
    }
    bs->file = image; /* the node's reference, dropped with the node after close */
    if (!image_name) { /* "blkdebug:CONFIG:IMAGE" names itself */
        char *name = node_filename(o, config, image);
        if (!name) {
            vd_error_setg(errp, ENOMEM, "Out of memory");
            free(s->rules);
            return -ENOMEM;
        }
        free(bs->filename);
        bs->filename = name;
    }
    return 0;
}

static void blkdebug_close(BlockNode *bs)
{
    BlkdebugState *s = bs->opaque;
    free(s->rules);
    pthread_mutex_destroy(&s->lock);
}

static void blkdebug_debug_event(BlockNode *bs, int event)
{
    BlkdebugState *s = bs->opaque;
    vd_mutex_lock(&s->lock);
    int64_t new_state = s->state;
    for (size_t i = 0; i < s->n; i++) {
        Rule *r = &s->rules[i];
        if (r->event != event || r->spent || (r->state && r->state != s->state)) {
            continue;
        }
        if (r->inject) {
            r->active = true;
        } else {
            new_state = r->new_state;
        }
    }
    s->state = new_state;
    vd_mutex_unlock(&s->lock);
}

/* The error an active rule injects into a request of [offset, offset+bytes) (flush: 0, 0). */
static int rule_check(BlockNode *bs, uint64_t offset, uint64_t bytes)
{
    BlkdebugState *s = bs->opaque;
    int err = 0;
    vd_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->n && !err; i++) {
        Rule *r = &s->rules[i];
        uint64_t so = (uint64_t)r->sector * 512;
        if (!r->active || r->spent ||
            (r->sector >= 0 && !(bytes && so >= offset && so < offset + bytes))) {
            continue;
        }
        err = r->err;
        if (r->once) {
            r->spent = true;
            r->active = false;
        }
    }
    vd_mutex_unlock(&s->lock);
    return -err;
}

static BlockNode *image_of(BlockNode *bs)
{
    return bs->file;
}

static int blkdebug_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    int ret = rule_check(bs, offset, bytes);
    return ret < 0 ? ret : vd_pread(image_of(bs), offset, bytes, buf);
}

static int blkdebug_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                           int flags)
{
    int ret = rule_check(bs, offset, bytes);
    return ret < 0 ? ret : vd_pwrite(image_of(bs), offset, bytes, buf, flags);
}

static int blkdebug_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    int ret = rule_check(bs, offset, bytes);
    return ret < 0 ? ret : vd_pwrite_zeroes(image_of(bs), offset, bytes, flags);
}

static int blkdebug_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    int ret = rule_check(bs, offset, bytes);
    return ret < 0 ? ret : vd_pdiscard(image_of(bs), offset, bytes, flags);
}

static int blkdebug_flush(BlockNode *bs)
{
    int ret = rule_check(bs, 0, 0);
    return ret < 0 ? ret : vd_flush(image_of(bs));
}

static int blkdebug_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                                 uint64_t *map, BlockNode **file)
{
    VdBlockStatus st;
    int ret = vd_block_status(image_of(bs), offset, bytes, pnum, &st);
    if (ret < 0) {
        return ret;
    }
    *map = st.offset;
    *file = st.file;
    return st.flags & (VD_BS_DATA | VD_BS_ZERO | VD_BS_OFFSET_VALID);
}

static int64_t blkdebug_getlength(BlockNode *bs)
{
    return vd_getlength(image_of(bs));
}

static int blkdebug_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                             VdError **errp)
{
    return vd_truncate(image_of(bs), size, shrink, prealloc, errp);
}

static int blkdebug_lock_for_format(BlockNode *bs, bool writable, VdError **errp)
{
    BlockNode *image = image_of(bs);
    return image->drv->lock_for_format ? image->drv->lock_for_format(image, writable, errp) : 0;
}

static const VdOptSpec blkdebug_blockdev_options[] = {
    {"image", VD_OPT_REF, true},
    {"config", VD_OPT_STR},
    {"align", VD_OPT_INT},
    {"inject-error", VD_OPT_ARRAY},
    {"set-state", VD_OPT_ARRAY},
    {NULL}};

const BlockDriver vd_drv_blkdebug = {
    .name = "blkdebug",
    .is_protocol = true,
    .filename_prefix = "blkdebug:",
    .blockdev_options = blkdebug_blockdev_options,
    .reads_zero_past_end = true,
    .state_size = sizeof(BlkdebugState),
    .open = blkdebug_open,
    .close = blkdebug_close,
    .pread = blkdebug_pread,
    .pwrite = blkdebug_pwrite,
    .pwrite_zeroes = blkdebug_pwrite_zeroes,
    .pdiscard = blkdebug_pdiscard,
    .flush = blkdebug_flush,
    .flush_syncs_file = true, /* blkdebug_flush flushes the image (after its rule check) */
    .block_status = blkdebug_block_status,
    .getlength = blkdebug_getlength,
    .truncate = blkdebug_truncate,
    .lock_for_format = blkdebug_lock_for_format,
    .debug_event = blkdebug_debug_event,
};
