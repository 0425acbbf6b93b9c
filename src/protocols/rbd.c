/*
 * rbd.c - the "rbd" protocol (vd_drv_rbd): a protocol node on a Ceph RBD image through librbd.
 *
 * Promises: every request is one librbd aio request waited for by its caller, so each calling
 * thread has one request in flight and librbd sees as many as there are callers (it splits each
 * into per-object requests itself). Reads past the end return zeroes; a write past the end grows
 * the image first (a qcow2 on RBD grows its file), under size_lock so growths never interleave.
 * Block status comes from rbd_diff_iterate2 (object map when the image has fast-diff), so copies
 * of sparse images stay sparse. A snapshot, or a node opened read-only, opens the image read-only.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/block.h"
#include "protocols/rbd.h"
#include "util/lock.h"

#define RBD_PREFIX "rbd:"
/* How long connecting may take before the open fails (a conf file may say otherwise). */
#define RBD_MOUNT_TIMEOUT "30"
/* rbd_diff_iterate2's callback returns this to stop early (any negative value stops it). */
#define DIFF_STOP (-9000)
#define RBD_MAX_KV 16

typedef struct RbdSpec {
    char *buf; /* the parsed copy of the filename; the fields point into it */
    const char *pool, *nspace, *image, *snap, *conf, *user;
    const char *key[RBD_MAX_KV], *val[RBD_MAX_KV];
    int nkv;
} RbdSpec;

typedef struct RbdState {
    rados_t cluster;
    rados_ioctx_t io;
    rbd_image_t image;
    bool connected, have_io, have_image;
    bool read_only;
    bool no_flush;
    bool fast_diff;           /* rbd_diff_iterate2 answers from the object map */
    uint64_t size;            /* image size as last seen; atomic loads, stores under size_lock */
    pthread_mutex_t size_lock;
    bool lock_init;
} RbdState;

/*
 * librbd and librados are loaded when the first rbd node is opened, not linked: linked, their
 * start-up (libceph-common, boost, ibverbs) costs every vdisk and vdiskd process a few ms, and
 * about half a second under ASan, whether or not it ever touches Ceph. The headers still give
 * each pointer its exact type.
 */
#define RBD_LIB_FUNCS(X) \
    X(rados_conf_parse_env) \
    X(rados_conf_read_file) \
    X(rados_conf_set) \
    X(rados_connect) \
    X(rados_create) \
    X(rados_ioctx_create) \
    X(rados_ioctx_destroy) \
    X(rados_ioctx_set_namespace) \
    X(rados_shutdown) \
    X(rbd_aio_create_completion) \
    X(rbd_aio_discard) \
    X(rbd_aio_flush) \
    X(rbd_aio_get_return_value) \
    X(rbd_aio_read) \
    X(rbd_aio_release) \
    X(rbd_aio_wait_for_complete) \
    X(rbd_aio_write) \
    X(rbd_aio_write_zeroes) \
    X(rbd_close) \
    X(rbd_create4) \
    X(rbd_diff_iterate2) \
    X(rbd_get_features) \
    X(rbd_get_flags) \
    X(rbd_get_size) \
    X(rbd_image_options_create) \
    X(rbd_image_options_destroy) \
    X(rbd_open) \
    X(rbd_open_read_only) \
    X(rbd_resize)

static struct {
#define X(f) __typeof__(f) *f;
    RBD_LIB_FUNCS(X)
#undef X
} lib;

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static char lib_error[256];

static void lib_load_once(void)
{
    void *rados = dlopen("librados.so.2", RTLD_NOW | RTLD_LOCAL);
    void *rbd = rados ? dlopen("librbd.so.1", RTLD_NOW | RTLD_LOCAL) : NULL;
    if (!rbd) {
        snprintf(lib_error, sizeof(lib_error), "cannot load librbd (Debian: apt-get install "
                 "librbd1): %s", dlerror());
        return;
    }
#define X(f)                                                                         \
    if (!lib_error[0] && !(lib.f = (__typeof__(f) *)dlsym(!strncmp(#f, "rbd_", 4) ? rbd    \
                                                                : rados, #f))) {     \
        snprintf(lib_error, sizeof(lib_error), "librbd has no %s: %s", #f, dlerror()); \
    }
    RBD_LIB_FUNCS(X)
#undef X
}

/* Load librbd once per process; 0, or -ENOSYS with a message when it cannot be loaded. */
static int lib_load(VdError **errp)
{
    pthread_once(&lib_once, lib_load_once);
    if (lib_error[0]) {
        vd_error_setg(errp, ENOSYS, "rbd: %s", lib_error);
        return -ENOSYS;
    }
    return 0;
}

static RbdState *rs_of(BlockNode *bs)
{
    return bs->opaque;
}

/* ---- filenames ---- */

static bool is_rbd_filename(const char *filename)
{
    return filename && !strncmp(filename, RBD_PREFIX, strlen(RBD_PREFIX));
}

/*
 * Cut the token at *p before the first unescaped character of delims; *p moves past that
 * character (or to NULL at the end), *found is the delimiter (or '\0'). Escapes stay until
 * unescape(), so a later split of the token still sees them.
 */
static char *next_tok(char **p, const char *delims, char *found)
{
    char *start = *p, *c;
    for (c = start; *c; c++) {
        if (*c == '\\' && c[1]) {
            c++;
        } else if (strchr(delims, *c)) {
            *found = *c;
            *c = '\0';
            *p = c + 1;
            return start;
        }
    }
    *found = '\0';
    *p = NULL;
    return start;
}

static void unescape(char *s)
{
    char *o = s;
    for (; *s; s++) {
        if (*s == '\\' && s[1]) {
            s++;
        }
        *o++ = *s;
    }
    *o = '\0';
}

static void spec_clear(RbdSpec *sp)
{
    free(sp->buf);
    memset(sp, 0, sizeof(*sp));
}

/* Parse "rbd:POOL[/NS]/IMAGE[@SNAP][:k=v]..." (QEMU's syntax) into sp. */
static int spec_parse(const char *filename, RbdSpec *sp, VdError **errp)
{
    memset(sp, 0, sizeof(*sp));
    if (!is_rbd_filename(filename)) {
        vd_error_setg(errp, EINVAL, "'%s' is not an rbd filename (rbd:POOL/IMAGE[@SNAP][:conf="
                      "PATH][:id=USER])", filename ? filename : "");
        return -EINVAL;
    }
    sp->buf = strdup(filename + strlen(RBD_PREFIX));
    if (!sp->buf) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    char *p = sp->buf, d;
    char *pool = next_tok(&p, "/", &d);
    if (!p || !*pool) {
        vd_error_setg(errp, EINVAL, "'%s': the pool name is required (rbd:POOL/IMAGE)", filename);
        goto fail;
    }
    char *image = next_tok(&p, "@:", &d);
    char *snap = NULL;
    if (d == '@') {
        snap = next_tok(&p, ":", &d);
    }
    /* "NAMESPACE/IMAGE": a second unescaped '/' (QEMU's form). */
    char *ns = NULL;
    char *after_ns = image;
    char *first = next_tok(&after_ns, "/", &d);
    if (after_ns) {
        ns = first;
        image = after_ns;
    }
    if (!*image || (snap && !*snap)) {
        vd_error_setg(errp, EINVAL, "'%s': the %s name is empty", filename,
                      *image ? "snapshot" : "image");
        goto fail;
    }
    while (p) {
        char *kv = next_tok(&p, ":", &d);
        char *v = kv;
        char *k = next_tok(&v, "=", &d);
        if (!v || !*k) {
            vd_error_setg(errp, EINVAL, "'%s': option '%s' is not KEY=VALUE", filename, kv);
            goto fail;
        }
        unescape(k);
        unescape(v);
        if (!strcmp(k, "conf")) {
            sp->conf = v;
        } else if (!strcmp(k, "id")) {
            sp->user = v;
        } else if (sp->nkv < RBD_MAX_KV) {
            sp->key[sp->nkv] = k;
            sp->val[sp->nkv++] = v;
        } else {
            vd_error_setg(errp, EINVAL, "'%s': more than %d options", filename, RBD_MAX_KV);
            goto fail;
        }
    }
    unescape(pool);
    unescape(image);
    if (ns) {
        unescape(ns);
    }
    if (snap) {
        unescape(snap);
    }
    sp->pool = pool;
    sp->nspace = ns;
    sp->image = image;
    sp->snap = snap;
    return 0;
fail:
    spec_clear(sp);
    return -EINVAL;
}

/* Append s with the characters the parser splits on escaped. */
static char *esc_append(char *o, const char *s)
{
    for (; *s; s++) {
        if (strchr(":@/\\=", *s)) {
            *o++ = '\\';
        }
        *o++ = *s;
    }
    *o = '\0';
    return o;
}

char *vd_rbd_make_filename(const char *pool, const char *nspace, const char *image,
                           const char *snap, const char *conf, const char *user)
{
    const char *parts[] = {pool, nspace, image, snap, conf, user};
    size_t cap = 64;
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        cap += parts[i] ? 2 * strlen(parts[i]) : 0;
    }
    char *out = malloc(cap);
    if (!out) {
        return NULL;
    }
    char *o = out + sprintf(out, "%s", RBD_PREFIX);
    o = esc_append(o, pool ? pool : "");
    *o++ = '/';
    if (nspace && *nspace) {
        o = esc_append(o, nspace);
        *o++ = '/';
    }
    o = esc_append(o, image ? image : "");
    if (snap && *snap) {
        *o++ = '@';
        o = esc_append(o, snap);
    }
    if (conf && *conf) {
        o += sprintf(o, ":conf=");
        o = esc_append(o, conf);
    }
    if (user && *user) {
        o += sprintf(o, ":id=");
        o = esc_append(o, user);
    }
    *o = '\0';
    return out;
}

/* ---- connecting ---- */

static void rbd_state_close(RbdState *s)
{
    if (s->have_image) {
        lib.rbd_close(s->image);
        s->have_image = false;
    }
    if (s->have_io) {
        lib.rados_ioctx_destroy(s->io);
        s->have_io = false;
    }
    if (s->connected) {
        lib.rados_shutdown(s->cluster);
        s->connected = false;
    }
    if (s->lock_init) {
        pthread_mutex_destroy(&s->size_lock);
        s->lock_init = false;
    }
}

/* Connect to the cluster sp names and open an I/O context on its pool (and namespace). */
static int cluster_connect(RbdState *s, const RbdSpec *sp, const char *filename, VdError **errp)
{
    int r = lib_load(errp);
    if (r < 0) {
        return r;
    }
    r = lib.rados_create(&s->cluster, sp->user);
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Could not open '%s': cannot create a cluster handle",
                            filename);
        return r;
    }
    s->connected = true; /* rados_shutdown also frees a handle that never connected */
    lib.rados_conf_set(s->cluster, "client_mount_timeout", RBD_MOUNT_TIMEOUT);
    /* No conf named: the default search (CEPH_CONF, /etc/ceph/ceph.conf), none is fine. */
    r = lib.rados_conf_read_file(s->cluster, sp->conf);
    if (r < 0 && sp->conf) {
        vd_error_setg_errno(errp, -r, "Could not open '%s': cannot read the Ceph configuration "
                            "'%s'", filename, sp->conf);
        return r;
    }
    lib.rados_conf_parse_env(s->cluster, NULL);
    for (int i = 0; i < sp->nkv; i++) {
        r = lib.rados_conf_set(s->cluster, sp->key[i], sp->val[i]);
        if (r < 0) {
            vd_error_setg_errno(errp, -r, "Could not open '%s': bad Ceph option %s=%s", filename,
                                sp->key[i], sp->val[i]);
            return r;
        }
    }
    r = lib.rados_connect(s->cluster);
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Could not open '%s': cannot connect to the Ceph cluster",
                            filename);
        return r;
    }
    r = lib.rados_ioctx_create(s->cluster, sp->pool, &s->io);
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Could not open '%s': cannot open pool '%s'", filename,
                            sp->pool);
        return r;
    }
    s->have_io = true;
    lib.rados_ioctx_set_namespace(s->io, sp->nspace ? sp->nspace : "");
    return 0;
}

static int rbd_drv_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    RbdState *s = rs_of(bs);
    memset(s, 0, sizeof(*s));
    RbdSpec sp;
    int r = spec_parse(opts->filename, &sp, errp);
    if (r < 0) {
        return r;
    }
    if (pthread_mutex_init(&s->size_lock, NULL) != 0) {
        spec_clear(&sp);
        vd_error_setg(errp, ENOMEM, "Could not open '%s': out of resources", opts->filename);
        return -ENOMEM;
    }
    s->lock_init = true;
    r = cluster_connect(s, &sp, opts->filename, errp);
    if (r < 0) {
        goto fail;
    }
    s->read_only = sp.snap || !(opts->flags & VD_OPEN_RDWR);
    s->no_flush = (opts->flags & VD_OPEN_NO_FLUSH) != 0;
    r = s->read_only ? lib.rbd_open_read_only(s->io, sp.image, &s->image, sp.snap)
                     : lib.rbd_open(s->io, sp.image, &s->image, NULL);
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Could not open '%s': cannot open image '%s'%s%s",
                            opts->filename, sp.image, sp.snap ? " at snapshot " : "",
                            sp.snap ? sp.snap : "");
        goto fail;
    }
    s->have_image = true;
    uint64_t features = 0, flags = 0;
    if (lib.rbd_get_features(s->image, &features) == 0 && lib.rbd_get_flags(s->image, &flags) == 0) {
        s->fast_diff = (features & RBD_FEATURE_FAST_DIFF) && !(flags & RBD_FLAG_FAST_DIFF_INVALID);
    }
    r = lib.rbd_get_size(s->image, &s->size);
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Could not open '%s': cannot get the image size",
                            opts->filename);
        goto fail;
    }
    bs->read_only = s->read_only;
    spec_clear(&sp);
    return 0;
fail:
    spec_clear(&sp);
    rbd_state_close(s);
    return r;
}

static void rbd_drv_close(BlockNode *bs)
{
    rbd_state_close(rs_of(bs));
}

/* ---- I/O: one aio request, waited for ---- */

typedef enum { RBD_OP_READ, RBD_OP_WRITE, RBD_OP_DISCARD, RBD_OP_ZERO, RBD_OP_FLUSH } RbdOp;

/* Issue op and wait; returns the bytes read for reads, 0 for the others, or -errno. */
static ssize_t aio_run(RbdState *s, RbdOp op, uint64_t off, uint64_t len, void *buf,
                       int zero_flags)
{
    rbd_completion_t c;
    int r = lib.rbd_aio_create_completion(NULL, NULL, &c);
    if (r < 0) {
        return r;
    }
    switch (op) {
    case RBD_OP_READ:
        r = lib.rbd_aio_read(s->image, off, (size_t)len, buf, c);
        break;
    case RBD_OP_WRITE:
        r = lib.rbd_aio_write(s->image, off, (size_t)len, buf, c);
        break;
    case RBD_OP_DISCARD:
        r = lib.rbd_aio_discard(s->image, off, len, c);
        break;
    case RBD_OP_ZERO:
        r = lib.rbd_aio_write_zeroes(s->image, off, (size_t)len, c, zero_flags, 0);
        break;
    case RBD_OP_FLUSH:
        r = lib.rbd_aio_flush(s->image, c);
        break;
    }
    ssize_t ret = r;
    if (r == 0) {
        lib.rbd_aio_wait_for_complete(c);
        ret = lib.rbd_aio_get_return_value(c);
    }
    lib.rbd_aio_release(c);
    if (ret > 0 && op != RBD_OP_READ) {
        ret = 0; /* librbd answers a write with 0 or its length, depending on the path */
    }
    return ret;
}

static uint64_t size_now(RbdState *s)
{
    return __atomic_load_n(&s->size, __ATOMIC_ACQUIRE);
}

/* Resize to exactly size (growing or shrinking), keeping s->size in step. */
static int set_size(RbdState *s, uint64_t size)
{
    vd_mutex_lock(&s->size_lock);
    int r = lib.rbd_resize(s->image, size);
    if (r == 0) {
        __atomic_store_n(&s->size, size, __ATOMIC_RELEASE);
    }
    vd_mutex_unlock(&s->size_lock);
    return r;
}

/* A write reaching past the end grows the image to its end first (QEMU's rbd does the same). */
static int grow_for(RbdState *s, uint64_t end)
{
    if (end <= size_now(s)) {
        return 0;
    }
    vd_mutex_lock(&s->size_lock);
    int r = 0;
    if (end > s->size) {
        r = lib.rbd_resize(s->image, end);
        if (r == 0) {
            __atomic_store_n(&s->size, end, __ATOMIC_RELEASE);
        }
    }
    vd_mutex_unlock(&s->size_lock);
    return r;
}

static int rbd_drv_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    RbdState *s = rs_of(bs);
    uint64_t size = size_now(s);
    uint64_t n = offset >= size ? 0 : (bytes < size - offset ? bytes : size - offset);
    ssize_t got = 0;
    if (n > 0) {
        got = aio_run(s, RBD_OP_READ, offset, n, buf, 0);
        if (got < 0) {
            return (int)got;
        }
    }
    /* Past the end (or a short read at it) reads zeroes. */
    if ((uint64_t)got < bytes) {
        memset((uint8_t *)buf + got, 0, bytes - (uint64_t)got);
    }
    return 0;
}

static int rbd_drv_flush(BlockNode *bs)
{
    RbdState *s = rs_of(bs);
    if (s->read_only || s->no_flush) {
        return 0;
    }
    return (int)aio_run(s, RBD_OP_FLUSH, 0, 0, NULL, 0);
}

/* Common shape of the writing requests: refuse, grow, issue, honour FUA. */
static int write_op(BlockNode *bs, RbdOp op, uint64_t offset, uint64_t bytes, const void *buf,
                    int flags, int zero_flags)
{
    RbdState *s = rs_of(bs);
    if (s->read_only) {
        return -EPERM;
    }
    int r = grow_for(s, offset + bytes);
    if (r < 0) {
        return r;
    }
    ssize_t ret = aio_run(s, op, offset, bytes, (void *)buf, zero_flags);
    if (ret < 0) {
        return (int)ret;
    }
    return (flags & VD_REQ_FUA) ? rbd_drv_flush(bs) : 0;
}

static int rbd_drv_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                          int flags)
{
    return write_op(bs, RBD_OP_WRITE, offset, bytes, buf, flags, 0);
}

static int rbd_drv_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    /* Without MAY_UNMAP the zeroes must stay allocated (thick). Never "fast" by promise. */
    if (flags & VD_REQ_NO_FALLBACK) {
        return -ENOTSUP;
    }
    int zf = (flags & VD_REQ_MAY_UNMAP) ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
    return write_op(bs, RBD_OP_ZERO, offset, bytes, NULL, flags, zf);
}

static int rbd_drv_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    RbdState *s = rs_of(bs);
    uint64_t size = size_now(s);
    if (offset >= size) {
        return 0;
    }
    if (bytes > size - offset) {
        bytes = size - offset;
    }
    return write_op(bs, RBD_OP_DISCARD, offset, bytes, NULL, flags & ~VD_REQ_FUA, 0);
}

/* ---- block status ---- */

typedef struct DiffScan {
    uint64_t offset;      /* the queried start */
    uint64_t data_end;    /* end of the contiguous data extent starting at offset, if any */
    uint64_t hole_end;    /* where data starts when offset is in a hole; 0 = not seen yet */
    bool in_data;
} DiffScan;

static int diff_cb(uint64_t off, size_t len, int exists, void *opaque)
{
    DiffScan *d = opaque;
    /* Extents come in ascending order; "exists == 0" ones are discarded data: holes. */
    if (!exists) {
        return d->in_data ? DIFF_STOP : 0;
    }
    uint64_t end = off + len;
    if (d->in_data) {
        if (off > d->data_end) {
            return DIFF_STOP; /* a gap: the data extent ended */
        }
        d->data_end = end > d->data_end ? end : d->data_end;
        return 0;
    }
    if (off <= d->offset) {
        if (end > d->offset) {
            d->in_data = true;
            d->data_end = end;
        }
        return 0;
    }
    d->hole_end = off;
    return DIFF_STOP;
}

static int rbd_drv_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                                uint64_t *map, BlockNode **file)
{
    RbdState *s = rs_of(bs);
    int ret = VD_BS_ALLOCATED | VD_BS_OFFSET_VALID;
    *map = offset;
    *file = bs;
    *pnum = bytes;
    uint64_t size = size_now(s);
    if (offset >= size) {
        return ret | VD_BS_ZERO;
    }
    if (bytes > size - offset) {
        bytes = size - offset;
        *pnum = bytes;
    }
    if (!s->fast_diff) {
        return ret | VD_BS_DATA; /* listing every object would cost more than copying zeroes */
    }
    DiffScan d = {.offset = offset};
    int r = lib.rbd_diff_iterate2(s->image, NULL, offset, bytes, 1, 1, diff_cb, &d);
    if (r < 0 && r != DIFF_STOP) {
        return r;
    }
    if (d.in_data) {
        uint64_t n = d.data_end - offset;
        *pnum = n < bytes ? n : bytes;
        return ret | VD_BS_DATA;
    }
    if (d.hole_end > offset) {
        uint64_t n = d.hole_end - offset;
        *pnum = n < bytes ? n : bytes;
    }
    return ret | VD_BS_ZERO;
}

/* ---- size, create ---- */

static int64_t rbd_drv_getlength(BlockNode *bs)
{
    RbdState *s = rs_of(bs);
    uint64_t size;
    int r = lib.rbd_get_size(s->image, &size);
    if (r < 0) {
        return r;
    }
    return (int64_t)size;
}

static int rbd_drv_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                            VdError **errp)
{
    RbdState *s = rs_of(bs);
    uint64_t cur = size_now(s);
    if (prealloc != VD_PREALLOC_OFF) {
        vd_error_setg(errp, ENOTSUP, "'%s': RBD images support only preallocation mode 'off' "
                      "on resize", bs->filename);
        return -ENOTSUP;
    }
    if (size < cur && !shrink) {
        vd_error_setg(errp, EINVAL, "Shrinking '%s' needs the shrink option", bs->filename);
        return -EINVAL;
    }
    if (size == cur) {
        return 0;
    }
    int r = set_size(s, size);
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Could not resize '%s' to %llu bytes", bs->filename,
                            (unsigned long long)size);
    }
    return r;
}

static int rbd_drv_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    if (opts->prealloc != VD_PREALLOC_OFF && opts->prealloc != VD_PREALLOC_FULL) {
        vd_error_setg(errp, ENOTSUP, "'%s': RBD images support preallocation 'off' or 'full'",
                      filename);
        return -ENOTSUP;
    }
    RbdSpec sp;
    int r = spec_parse(filename, &sp, errp);
    if (r < 0) {
        return r;
    }
    if (sp.snap) {
        vd_error_setg(errp, EINVAL, "Could not create '%s': cannot create a snapshot this way",
                      filename);
        spec_clear(&sp);
        return -EINVAL;
    }
    RbdState s = {0};
    r = cluster_connect(&s, &sp, filename, errp);
    if (r == 0) {
        rbd_image_options_t io_opts;
        lib.rbd_image_options_create(&io_opts);
        r = lib.rbd_create4(s.io, sp.image, opts->size, io_opts);
        lib.rbd_image_options_destroy(io_opts);
        if (r < 0) {
            vd_error_setg_errno(errp, -r, "Could not create '%s'", filename);
        }
    }
    if (r == 0 && opts->prealloc == VD_PREALLOC_FULL && opts->size > 0) {
        r = lib.rbd_open(s.io, sp.image, &s.image, NULL);
        if (r == 0) {
            s.have_image = true;
            /* write_zeroes of a whole image can exceed size_t on 32 bits: not a concern here. */
            r = (int)aio_run(&s, RBD_OP_ZERO, 0, opts->size, NULL,
                             RBD_WRITE_ZEROES_FLAG_THICK_PROVISION);
        }
        if (r < 0) {
            vd_error_setg_errno(errp, -r, "Could not preallocate '%s'", filename);
        }
    }
    rbd_state_close(&s);
    spec_clear(&sp);
    return r;
}

static int rbd_drv_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return 0; /* a protocol, never a format guess */
}

#define RBD_CONF_HINT " (name the cluster and its keys in a Ceph configuration file: 'conf')"

/* BlockdevOptionsRbd; encrypt is refused by the QMP layer, the keys and monitors here. */
static const VdOptSpec rbd_blockdev_options[] = {
    {"pool", VD_OPT_STR, true},
    {"namespace", VD_OPT_STR},
    {"image", VD_OPT_STR, true},
    {"conf", VD_OPT_STR},
    {"snapshot", VD_OPT_STR},
    {"user", VD_OPT_STR},
    {"encrypt", VD_OPT_OBJ}, /* RbdEncryptionOptions */
    {"key-secret", VD_OPT_STR, .unsupported = RBD_CONF_HINT},
    {"auth-client-required", VD_OPT_ARRAY, .unsupported = RBD_CONF_HINT},
    {"server", VD_OPT_ARRAY, .unsupported = RBD_CONF_HINT},
    {NULL}};

/* The QEMU-style filename of a blockdev-add rbd node (vd_rbd_make_filename escapes the parts). */
static char *rbd_blockdev_filename(const VdOptReader *o, VdError **errp)
{
    const char *pool = o->str(o, "pool"), *image = o->str(o, "image");
    char *name = vd_rbd_make_filename(pool ? pool : "", o->str(o, "namespace"),
                                      image ? image : "", o->str(o, "snapshot"),
                                      o->str(o, "conf"), o->str(o, "user"));
    if (!name) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    return name;
}

const BlockDriver vd_drv_rbd = {
    .name = "rbd",
    .is_protocol = true,
    .supports_backing = false,
    .filename_prefix = RBD_PREFIX,
    .blockdev_options = rbd_blockdev_options,
    .blockdev_filename = rbd_blockdev_filename,
    .may_block = true, /* every request waits for the cluster */
    .state_size = sizeof(RbdState),
    .probe = rbd_drv_probe,
    .open = rbd_drv_open,
    .close = rbd_drv_close,
    .create = rbd_drv_create,
    .pread = rbd_drv_pread,
    .pwrite = rbd_drv_pwrite,
    .pwrite_zeroes = rbd_drv_pwrite_zeroes,
    .pdiscard = rbd_drv_pdiscard,
    .flush = rbd_drv_flush,
    .block_status = rbd_drv_block_status,
    .getlength = rbd_drv_getlength,
    .truncate = rbd_drv_truncate,
};
