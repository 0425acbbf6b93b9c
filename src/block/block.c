/*
 * block.c - driver registry, opening images and their backing chains, node lifetime, creation.
 *
 * Promises: vd_open returns a fully built chain or nothing (no half-open nodes leak); backing
 * nodes are always read-only; a backing file is never format-probed unless the caller allowed it
 * (a guest could otherwise write a qcow2 header into a raw base and read host files through it);
 * loops are detected by (st_dev, st_ino), so different spellings of one file are caught.
 * Refcounts are atomic; building and tearing down chains is single-threaded (see block.h).
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "block/write-hooks.h"
#include "util/log.h"

#define PROBE_BUF_SIZE 2048
#define MAX_CHAIN_DEPTH 1000

/* ---- paths ---- */

char *vd_resolve_backing_path(const char *image_filename, const char *backing_file)
{
    if (!backing_file) {
        return NULL;
    }
    if (backing_file[0] == '/' || vd_filename_is_uri(backing_file) || !image_filename ||
        vd_filename_is_uri(image_filename)) {
        return strdup(backing_file);
    }
    const char *slash = strrchr(image_filename, '/');
    if (!slash) {
        return strdup(backing_file); /* image in the current directory */
    }
    size_t dirlen = (size_t)(slash - image_filename) + 1; /* keep the '/' */
    size_t blen = strlen(backing_file);
    char *out = malloc(dirlen + blen + 1);
    if (!out) {
        return NULL;
    }
    memcpy(out, image_filename, dirlen);
    memcpy(out + dirlen, backing_file, blen + 1);
    return out;
}

/* Make an absolute, lexically normalised path ("." and ".." folded, no symlink resolution). */
static char *absolute_path(const char *path)
{
    char *joined;
    if (path[0] == '/') {
        joined = strdup(path);
    } else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof(cwd))) {
            return NULL;
        }
        if (asprintf(&joined, "%s/%s", cwd, path) < 0) {
            joined = NULL;
        }
    }
    if (!joined) {
        return NULL;
    }
    /* Fold components in place. */
    size_t len = strlen(joined);
    char *out = malloc(len + 2);
    if (!out) {
        free(joined);
        return NULL;
    }
    size_t o = 0;
    char *save = NULL;
    for (char *tok = strtok_r(joined, "/", &save); tok; tok = strtok_r(NULL, "/", &save)) {
        if (!strcmp(tok, ".")) {
            continue;
        }
        if (!strcmp(tok, "..")) {
            while (o > 0 && out[o - 1] != '/') {
                o--;
            }
            if (o > 0) {
                o--; /* drop the '/' */
            }
            continue;
        }
        out[o++] = '/';
        size_t tl = strlen(tok);
        memcpy(out + o, tok, tl);
        o += tl;
    }
    if (o == 0) {
        out[o++] = '/';
    }
    out[o] = '\0';
    free(joined);
    return out;
}

/* Resolve symlinks in the directory part if it exists (so /tmp vs /private/tmp style aliases
 * compare equal), keeping the last component as is. */
static char *canonical_dir_path(const char *path)
{
    char *abs = absolute_path(path);
    if (!abs) {
        return NULL;
    }
    char *slash = strrchr(abs, '/');
    char *base = strdup(slash + 1);
    *slash = '\0';
    char *real = realpath(abs[0] ? abs : "/", NULL);
    char *out = NULL;
    if (real && base) {
        if (asprintf(&out, "%s/%s", strcmp(real, "/") ? real : "", base) < 0) {
            out = NULL;
        }
    } else if (base) {
        *slash = '/';
        out = strdup(abs);
    }
    free(real);
    free(base);
    free(abs);
    return out;
}

char *vd_relative_path(const char *image_filename, const char *target_path)
{
    if (!target_path) {
        return NULL;
    }
    if (vd_filename_is_uri(target_path) || !image_filename || vd_filename_is_uri(image_filename)) {
        return strdup(target_path);
    }
    char *img = canonical_dir_path(image_filename);
    char *tgt = canonical_dir_path(target_path);
    char *out = NULL;
    if (!img || !tgt) {
        goto done;
    }
    /* Directory of the image, with a trailing '/'. */
    char *islash = strrchr(img, '/');
    islash[1] = '\0';
    /* Longest common prefix ending at a '/'. */
    size_t common = 0;
    for (size_t i = 0; img[i] && tgt[i] && img[i] == tgt[i]; i++) {
        if (img[i] == '/') {
            common = i + 1;
        }
    }
    size_t ups = 0;
    for (const char *p = img + common; *p; p++) {
        if (*p == '/') {
            ups++;
        }
    }
    size_t rest = strlen(tgt + common);
    out = malloc(ups * 3 + rest + 1);
    if (!out) {
        goto done;
    }
    size_t o = 0;
    for (size_t i = 0; i < ups; i++) {
        memcpy(out + o, "../", 3);
        o += 3;
    }
    memcpy(out + o, tgt + common, rest + 1);
done:
    free(img);
    free(tgt);
    return out;
}

/* ---- nodes ---- */

static unsigned int node_counter;

static BlockNode *node_new(const BlockDriver *drv, const char *filename, const char *node_name,
                           int flags)
{
    BlockNode *bs = calloc(1, sizeof(*bs));
    if (!bs) {
        return NULL;
    }
    bs->drv = drv;
    bs->refcnt = 1;
    bs->open_flags = flags;
    bs->read_only = !(flags & VD_OPEN_RDWR);
    if (drv->state_size) {
        bs->opaque = calloc(1, drv->state_size);
        if (!bs->opaque) {
            free(bs);
            return NULL;
        }
    }
    bs->filename = strdup(filename ? filename : "");
    if (node_name) {
        bs->node_name = strdup(node_name);
    } else {
        unsigned int id = __atomic_fetch_add(&node_counter, 1, __ATOMIC_RELAXED);
        if (asprintf(&bs->node_name, "#block%u", id) < 0) {
            bs->node_name = NULL;
        }
    }
    if (!bs->filename || !bs->node_name || vd_write_hooks_init(bs) < 0) {
        free(bs->filename);
        free(bs->node_name);
        free(bs->opaque);
        free(bs);
        return NULL;
    }
    return bs;
}

/* Free a node whose driver open failed or never ran (no close). */
static void node_free_unopened(BlockNode *bs)
{
    if (!bs) {
        return;
    }
    if (bs->file) {
        vd_node_unref(bs->file);
    }
    if (bs->backing) {
        vd_node_unref(bs->backing);
    }
    vd_node_unref(bs->data_file);
    free(bs->backing_file);
    free(bs->backing_format);
    free(bs->full_backing_filename);
    free(bs->filename);
    free(bs->node_name);
    free(bs->opaque);
    vd_bitmaps_free(bs);
    vd_write_hooks_free(bs);
    free(bs);
}

BlockNode *vd_filter_new(const BlockDriver *drv, BlockNode *child, const char *node_name)
{
    BlockNode *bs = node_new(drv, child->filename, node_name, VD_OPEN_RDWR);
    if (bs) {
        vd_node_set_backing(bs, child);
    }
    return bs;
}

int64_t vd_filter_getlength(BlockNode *bs)
{
    return vd_getlength(bs->backing);
}

int vd_filter_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    return vd_pread(bs->backing, offset, bytes, buf);
}

int vd_filter_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    return vd_pwrite(bs->backing, offset, bytes, buf, flags);
}

int vd_filter_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    return vd_pwrite_zeroes(bs->backing, offset, bytes, flags);
}

int vd_filter_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    return vd_pdiscard(bs->backing, offset, bytes, flags);
}

int vd_filter_flush(BlockNode *bs)
{
    (void)bs;
    return 0;
}

uint32_t vd_filter_cluster_size(BlockNode *bs)
{
    BlockNode *child = bs->backing;
    return child && child->drv->cluster_size ? child->drv->cluster_size(child) : 0;
}

int vd_filter_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                           uint64_t *map, BlockNode **file)
{
    (void)bs, (void)offset, (void)map, (void)file;
    *pnum = bytes;
    return 0;
}

void vd_node_ref(BlockNode *bs)
{
    if (bs) {
        __atomic_add_fetch(&bs->refcnt, 1, __ATOMIC_RELAXED);
    }
}

void vd_node_unref(BlockNode *bs)
{
    if (!bs) {
        return;
    }
    if (__atomic_sub_fetch(&bs->refcnt, 1, __ATOMIC_ACQ_REL) > 0) {
        return;
    }
    if (!bs->read_only) {
        int ret = vd_flush(bs);
        if (ret < 0) {
            vd_log(VD_LOG_WARN, "flushing '%s' on close failed: %s", bs->filename,
                   strerror(-ret));
        }
        VdError *err = NULL;
        if (vd_bitmaps_store(bs, &err) < 0) {
            /* the bitmaps stay marked in use in the image: inconsistent, never silently wrong */
            vd_log(VD_LOG_WARN, "storing the bitmaps of '%s' failed: %s", bs->filename,
                   vd_error_msg(err));
            vd_error_free(err);
        }
    }
    /* The format writes its last metadata through file in close, so file goes after. */
    if (bs->drv && bs->drv->close) {
        bs->drv->close(bs);
    }
    node_free_unopened(bs);
}

/* ---- probing ---- */

static const BlockDriver *probe_node(BlockNode *proto, int *score, VdError **errp)
{
    uint8_t buf[PROBE_BUF_SIZE];
    uint64_t len = PROBE_BUF_SIZE;
    int64_t size = vd_getlength(proto);
    if (size < 0) {
        vd_error_setg_errno(errp, (int)-size, "Could not get the size of '%s'", proto->filename);
        return NULL;
    }
    if ((uint64_t)size < len) {
        len = (uint64_t)size;
    }
    memset(buf, 0, sizeof(buf));
    int ret = len ? vd_pread(proto, 0, len, buf) : 0;
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not read '%s' to detect its format",
                            proto->filename);
        return NULL;
    }
    const BlockDriver *drv = vd_probe_bytes(buf, (size_t)len, proto->filename, score);
    if (!drv) {
        vd_error_setg(errp, ENOTSUP, "Could not determine the format of '%s'", proto->filename);
    }
    return drv;
}

/* ---- opening ---- */

typedef struct ChainSeen {
    dev_t dev[MAX_CHAIN_DEPTH];
    ino_t ino[MAX_CHAIN_DEPTH];
    int n;
} ChainSeen;

/*
 * drv: the protocol (NULL: the one the filename names). tls_creds and options: passed on to the
 * driver (nbd's TLS, the node's json:/--image-opts options), NULL for none.
 */
static BlockNode *open_protocol(const BlockDriver *drv, const char *filename, int flags,
                               const char *tls_creds, json_t *options, VdError **errp)
{
    if (!drv && !(drv = vd_protocol_for(filename, errp))) {
        return NULL;
    }
    BlockNode *bs = node_new(drv, filename, NULL, flags);
    if (!bs) {
        vd_error_setg(errp, ENOMEM, "Out of memory opening '%s'", filename);
        return NULL;
    }
    VdOpenOptions po = { .filename = filename, .format = drv->name, .flags = flags,
                         .tls_creds = tls_creds, .options = options };
    int ret = drv->open(bs, &po, errp);
    if (ret < 0) {
        node_free_unopened(bs);
        return NULL;
    }
    /* A driver may make the node read-only (an NBD server's read-only export): keep that. */
    bs->read_only = bs->read_only || !(flags & VD_OPEN_RDWR);
    return bs;
}

/* Remember (dev, ino) of a host file in the chain; -ELOOP if it is already there. */
static int chain_note_file(ChainSeen *seen, const char *filename, VdError **errp)
{
    if (vd_filename_is_uri(filename)) {
        return 0;
    }
    struct stat st;
    if (stat(filename, &st) < 0) {
        return 0; /* the open reports the real error */
    }
    for (int i = 0; i < seen->n; i++) {
        if (seen->dev[i] == st.st_dev && seen->ino[i] == st.st_ino) {
            vd_error_setg(errp, ELOOP, "Backing file loop: '%s' is already in the chain",
                          filename);
            return -ELOOP;
        }
    }
    if (seen->n >= MAX_CHAIN_DEPTH) {
        vd_error_setg(errp, EMLINK, "Backing chain too deep at '%s' (more than %d images)",
                      filename, MAX_CHAIN_DEPTH);
        return -EMLINK;
    }
    seen->dev[seen->n] = st.st_dev;
    seen->ino[seen->n] = st.st_ino;
    seen->n++;
    return 0;
}

static BlockNode *open_one(const VdOpenOptions *opts, ChainSeen *seen, bool is_backing,
                           VdError **errp);

int vd_backing_format_check(const BlockNode *bs, int flags, VdError **errp)
{
    if (bs->backing_format || (flags & VD_OPEN_ALLOW_PROBE)) {
        return 0;
    }
    vd_error_setg(errp, EPERM,
                  "Backing file '%s' of '%s' has no recorded format, and probing a backing "
                  "file's format is unsafe, so it is not done; give the format (-F FMT) or "
                  "record it with 'rebase -u -b %s -F FMT %s'",
                  bs->backing_file, bs->filename, bs->backing_file, bs->filename);
    return -EPERM;
}

/* The backing file bs names, opened with backing.* options that include its file child's. */
static int open_backing_tree(BlockNode *bs, json_t *bopt, int flags, VdError **errp)
{
    json_t *tree = json_deep_copy(bopt);
    json_t *file = json_object_get(tree, "file");
    const char *fmt = vd_options_str(bopt, "driver") ? NULL : bs->backing_format;
    if (!tree || json_object_set_new(file, "filename",
                                     json_string(bs->full_backing_filename)) < 0 ||
        (fmt && json_object_set_new(tree, "driver", json_string(fmt)) < 0)) {
        json_decref(tree);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    flags &= VD_OPEN_ALLOW_PROBE | VD_OPEN_DIRECT | VD_OPEN_FORCE_SHARE | VD_OPEN_NO_IO;
    BlockNode *backing = vd_open_options(tree, flags, false, errp);
    json_decref(tree);
    if (!backing) {
        vd_error_prepend(errp, "Could not open backing file: ");
        return -EINVAL;
    }
    bs->backing = backing;
    return 0;
}

static int open_backing(BlockNode *bs, const VdOpenOptions *opts, ChainSeen *seen,
                        VdError **errp)
{
    if (opts->backing) {
        vd_node_ref(opts->backing);
        bs->backing = opts->backing;
        return 0;
    }
    if (opts->flags & VD_OPEN_NO_BACKING) {
        return 0;
    }
    json_t *bopt = opts->backing_options;
    if (!bs->backing_file || !bs->backing_file[0]) {
        if (json_object_size(bopt) == 0) {
            return 0;
        }
        /* QEMU opens a backing from the options alone then, which these cannot name */
        vd_error_setg(errp, EINVAL, "Could not open backing file: %s",
                      vd_options_str(bopt, "driver") ? "A block device must be specified for "
                                                       "\"file\""
                                                     : "Must specify either driver or file");
        return -EINVAL;
    }
    const char *full = bs->full_backing_filename;
    if (!vd_options_str(opts->backing_options, "driver") &&
        vd_backing_format_check(bs, opts->flags, errp) < 0) {
        return -EPERM;
    }
    if (!vd_filename_is_uri(full)) {
        struct stat st;
        if (stat(full, &st) < 0) {
            int err = errno;
            vd_error_setg_errno(errp, err, "Could not open backing file: Could not open '%s'",
                                full);
            return -err;
        }
    }
    json_t *fopt = json_object_get(bopt, "file");
    if (json_is_object(fopt)) {
        /* backing.file.*: options of the protocol node under the file the image names */
        return open_backing_tree(bs, bopt, opts->flags, errp);
    }
    const char *key = vd_options_str(bopt, "key-secret");
    VdOpenOptions bo = {
        .filename = full,
        /* backing.driver= (--image-opts, json:) overrides the format the image records */
        .format = vd_options_str(bopt, "driver") ? vd_options_str(bopt, "driver")
                                                 : bs->backing_format,
        /* luks: key-secret; qcow2: encrypt.key-secret */
        .key_secret = key ? key : vd_options_str(json_object_get(bopt, "encrypt"), "key-secret"),
        .backing_options = json_object_get(bopt, "backing"),
        .flags = opts->flags & (VD_OPEN_ALLOW_PROBE | VD_OPEN_DIRECT | VD_OPEN_FORCE_SHARE |
                                VD_OPEN_NO_IO),
    };
    VdError *local = NULL;
    BlockNode *backing = open_one(&bo, seen, true, &local);
    if (!backing) {
        int code = vd_error_code(local);
        vd_error_propagate(errp, local);
        vd_error_prepend(errp, "Could not open backing file: ");
        return code ? -code : -EIO;
    }
    /* backing.* options the backing's driver does not take: refused as qemu-img does */
    if (bopt && vd_options_check_keys(bopt, backing->drv, errp) < 0) {
        vd_error_prepend(errp, "Could not open backing file: ");
        vd_node_unref(backing);
        return -EINVAL;
    }
    bs->backing = backing;
    return 0;
}

static BlockNode *open_one(const VdOpenOptions *opts, ChainSeen *seen, bool is_backing,
                           VdError **errp)
{
    const char *filename = opts->filename;
    if (!filename && opts->file) {
        filename = opts->file->filename;
    }
    if (!filename || !*filename) {
        vd_error_setg(errp, EINVAL, "No image filename given");
        return NULL;
    }
    /* a json: name parses into a tree, unless it comes from one (QEMU's name for such a node) */
    if (!opts->file && !opts->options && !strncmp(filename, "json:", 5)) {
        return vd_open_json(filename, opts->format, opts->flags, errp);
    }
    if (chain_note_file(seen, filename, errp) < 0) {
        return NULL;
    }

    BlockNode *proto;
    if (opts->file) {
        vd_node_ref(opts->file);
        proto = opts->file;
    } else {
        /* an option tree names its protocol; a plain filename's scheme or path decides */
        const BlockDriver *named = opts->options && opts->format ? vd_find_driver(opts->format)
                                                                 : NULL;
        proto = open_protocol(named && named->is_protocol ? named : NULL, filename,
                              opts->flags & ~VD_OPEN_WRITETHROUGH, opts->tls_creds, opts->options,
                              errp);
        if (!proto) {
            return NULL;
        }
    }

    const BlockDriver *drv;
    if (opts->format) {
        drv = vd_find_driver(opts->format);
        if (!drv) {
            vd_error_setg(errp, EINVAL, "Unknown image format '%s' for '%s'", opts->format,
                          filename);
            vd_node_unref(proto);
            return NULL;
        }
    } else {
        int score;
        drv = probe_node(proto, &score, errp);
        if (!drv) {
            vd_node_unref(proto);
            return NULL;
        }
        if (score <= VD_PROBE_ANY && !is_backing) {
            vd_log(VD_LOG_DEBUG, "'%s': no format header found, using %s", filename, drv->name);
        }
    }
    if (drv->is_protocol) {
        /* "-f file": the protocol node itself is the image. */
        proto->open_flags |= opts->flags & VD_OPEN_WRITETHROUGH;
        if (opts->node_name) {
            char *nn = strdup(opts->node_name);
            if (nn) {
                free(proto->node_name);
                proto->node_name = nn;
            }
        }
        return proto;
    }

    /* Over a protocol node opened here, the format node is named as it is (QEMU's nbd name). */
    BlockNode *bs = node_new(drv, opts->file ? filename : proto->filename, opts->node_name,
                             opts->flags);
    if (!bs) {
        vd_error_setg(errp, ENOMEM, "Out of memory opening '%s'", filename);
        vd_node_unref(proto);
        return NULL;
    }
    if (!drv->passthrough && proto->drv->lock_for_format &&
        proto->drv->lock_for_format(proto, (opts->flags & VD_OPEN_RDWR) != 0, errp) < 0) {
        vd_node_unref(proto);
        node_free_unopened(bs);
        return NULL;
    }
    bs->file = proto;
    int ret = drv->open(bs, opts, errp);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not open '%s' as %s", filename, drv->name);
        node_free_unopened(bs);
        return NULL;
    }
    if (!(opts->flags & VD_OPEN_CHECK) && vd_bitmaps_load(bs, errp) < 0) {
        /* close without storing: the image's bitmaps stay exactly as they were */
        vd_error_prepend(errp, "Could not open '%s': ", filename);
        drv->close(bs);
        node_free_unopened(bs);
        return NULL;
    }
    if (bs->backing_file && bs->backing_file[0]) {
        free(bs->full_backing_filename);
        bs->full_backing_filename = vd_resolve_backing_path(filename, bs->backing_file);
        if (!bs->full_backing_filename) {
            vd_error_setg(errp, ENOMEM, "Out of memory opening '%s'", filename);
            vd_node_unref(bs);
            return NULL;
        }
    }
    if (open_backing(bs, opts, seen, errp) < 0) {
        vd_node_unref(bs);
        return NULL;
    }
    vd_log(VD_LOG_DEBUG, "opened '%s' as %s (%s)%s%s", filename, drv->name,
           bs->read_only ? "read-only" : "read-write", bs->backing ? ", backing " : "",
           bs->backing ? bs->backing->filename : "");
    return bs;
}

BlockNode *vd_open(const VdOpenOptions *opts, VdError **errp)
{
    if (!opts) {
        vd_error_setg(errp, EINVAL, "No open options");
        return NULL;
    }
    ChainSeen *seen = calloc(1, sizeof(*seen));
    if (!seen) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    BlockNode *bs = open_one(opts, seen, false, errp);
    free(seen);
    return bs;
}

BlockNode *vd_open_image(const char *filename, const char *format, int flags, VdError **errp)
{
    VdOpenOptions o = { .filename = filename, .format = format, .flags = flags };
    return vd_open(&o, errp);
}

const char *vd_probe_format(const char *filename, VdError **errp)
{
    BlockNode *proto = open_protocol(NULL, filename, VD_OPEN_FORCE_SHARE, NULL, NULL, errp);
    if (!proto) {
        return NULL;
    }
    const BlockDriver *drv = probe_node(proto, NULL, errp);
    vd_node_unref(proto);
    return drv ? drv->name : NULL;
}

/* ---- creation ---- */

int vd_protocol_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    const BlockDriver *drv = vd_protocol_for(filename, errp);
    if (!drv) {
        return -ENOTSUP;
    }
    if (!drv->create) {
        vd_error_setg(errp, ENOTSUP, "Protocol driver '%s' does not support image creation",
                      drv->name);
        return -ENOTSUP;
    }
    return drv->create(filename, opts, errp);
}

int vd_create(const VdCreateOptions *opts, const char *filename, VdError **errp)
{
    if (!opts || !filename) {
        vd_error_setg(errp, EINVAL, "Image creation needs a filename");
        return -EINVAL;
    }
    const char *fmt = opts->format ? opts->format : "raw";
    const BlockDriver *drv = vd_find_driver(fmt);
    if (!drv) {
        vd_error_setg(errp, EINVAL, "Unknown file format '%s'", fmt);
        return -EINVAL;
    }
    if (!drv->create) {
        vd_error_setg(errp, ENOTSUP, "Format driver '%s' does not support image creation", fmt);
        return -ENOTSUP;
    }
    VdCreateOptions o = *opts;
    o.format = fmt;
    if (o.backing_file && !o.backing_file[0]) {
        o.backing_file = NULL;
    }
    if (o.backing_file) {
        if (!drv->supports_backing) {
            vd_error_setg(errp, ENOTSUP, "Format '%s' does not support backing files", fmt);
            return -ENOTSUP;
        }
        if (!strcmp(o.backing_file, filename)) {
            vd_error_setg(errp, EINVAL, "Trying to create an image with the same filename as "
                          "the backing file");
            return -EINVAL;
        }
        if (!o.backing_fmt) {
            /* qemu-img >= 6.1 refuses this too: the format would otherwise be probed later. */
            vd_error_setg(errp, EINVAL, "%s: Backing file specified without backing format "
                          "(use -F FMT)", filename);
            return -EINVAL;
        }
        if (!vd_find_driver(o.backing_fmt)) {
            vd_error_setg(errp, EINVAL, "Unknown backing file format '%s'", o.backing_fmt);
            return -EINVAL;
        }
        if (!o.unsafe) {
            char *full = vd_resolve_backing_path(filename, o.backing_file);
            if (!full) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                return -ENOMEM;
            }
            VdError *local = NULL;
            BlockNode *b = vd_open_image(full, o.backing_fmt, VD_OPEN_FORCE_SHARE, &local);
            if (!b) {
                int code = vd_error_code(local);
                vd_error_propagate(errp, local);
                vd_error_prepend(errp, "Could not open backing image '%s': ", full);
                free(full);
                return code ? -code : -EIO;
            }
            free(full);
            if (!o.size_given || o.size == 0) {
                int64_t len = vd_getlength(b);
                if (len < 0) {
                    vd_error_setg_errno(errp, (int)-len, "Could not get the size of the "
                                        "backing image '%s'", o.backing_file);
                    vd_node_unref(b);
                    return (int)len;
                }
                o.size = (uint64_t)len;
                o.size_given = true;
            }
            vd_node_unref(b);
        } else if (!o.size_given && o.size == 0) {
            vd_error_setg(errp, EINVAL, "Image creation needs a size parameter");
            return -EINVAL;
        }
    }
    /* qemu-img rounds every new image's size up to whole 512-byte sectors (raw and qcow2). */
    if (o.size % 512) {
        if (o.size > (uint64_t)INT64_MAX - 511) {
            vd_error_setg(errp, EINVAL, "Image size %llu is too large",
                          (unsigned long long)o.size);
            return -EINVAL;
        }
        o.size = (o.size + 511) / 512 * 512;
    }
    return drv->create(filename, &o, errp);
}

/* ---- chain reshaping and lookup ---- */

void vd_node_set_backing(BlockNode *bs, BlockNode *new_backing)
{
    if (new_backing) {
        vd_node_ref(new_backing);
    }
    BlockNode *old = bs->backing;
    bs->backing = new_backing;
    if (old) {
        vd_node_unref(old);
    }
}

/* A node's in-memory backing strings: the name as recorded, its format, the name resolved. */
typedef struct BackingStrings {
    char *file, *format, *full;
} BackingStrings;

static void backing_strings_free(BackingStrings *s)
{
    free(s->file);
    free(s->format);
    free(s->full);
}

/* New copies for bs (name and fmt may be NULL); -ENOMEM with nothing allocated. */
static int backing_strings_dup(BlockNode *bs, const char *name, const char *fmt,
                               BackingStrings *s)
{
    *s = (BackingStrings){0};
    if ((name && (!(s->file = strdup(name)) ||
                  !(s->full = vd_resolve_backing_path(bs->filename, name)))) ||
        (fmt && !(s->format = strdup(fmt)))) {
        backing_strings_free(s);
        return -ENOMEM;
    }
    return 0;
}

/* Replace bs's strings by s's (which bs owns from now on). */
static void backing_strings_install(BlockNode *bs, BackingStrings *s)
{
    free(bs->backing_file);
    free(bs->backing_format);
    free(bs->full_backing_filename);
    bs->backing_file = s->file;
    bs->backing_format = s->format;
    bs->full_backing_filename = s->full;
}

int vd_set_backing_strings(BlockNode *bs, const char *name, const char *fmt)
{
    BackingStrings n;
    if (backing_strings_dup(bs, name, fmt, &n) < 0) {
        return -ENOMEM;
    }
    backing_strings_install(bs, &n);
    return 0;
}

int vd_change_backing_file(BlockNode *bs, const char *backing_file, const char *backing_fmt,
                           VdError **errp)
{
    return vd_change_backing_file_flags(bs, backing_file, backing_fmt, 0, errp);
}

int vd_change_backing_file_flags(BlockNode *bs, const char *backing_file,
                                 const char *backing_fmt, int flags, VdError **errp)
{
    if (backing_file && !backing_file[0]) {
        backing_file = NULL;
    }
    if (!backing_file) {
        backing_fmt = NULL;
    }
    if (!bs->drv->change_backing_file) {
        vd_error_setg(errp, ENOTSUP, "Format '%s' of '%s' cannot record a backing file",
                      bs->drv->name, bs->filename);
        return -ENOTSUP;
    }
    if (bs->read_only) {
        vd_error_setg(errp, EPERM, "Cannot change the backing file of '%s': opened read-only",
                      bs->filename);
        return -EPERM;
    }
    BackingStrings n;
    if (backing_strings_dup(bs, backing_file, backing_fmt, &n) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    int ret = bs->drv->change_backing_file(bs, backing_file, backing_fmt, flags, errp);
    if (ret < 0) {
        backing_strings_free(&n);
        return ret;
    }
    backing_strings_install(bs, &n);
    return 0;
}

/* Internal snapshots: refuse formats without them, and read-only nodes, before the driver. */
static int snapshot_check(BlockNode *bs, bool supported, VdError **errp)
{
    if (!supported) {
        vd_error_setg(errp, ENOTSUP, "Block driver does not support snapshots");
        return -ENOTSUP;
    }
    if (bs->read_only) {
        vd_error_setg(errp, EPERM, "'%s' is opened read-only", bs->filename);
        return -EPERM;
    }
    return 0;
}

int vd_snapshot_create(BlockNode *bs, const char *name, VdError **errp)
{
    int ret = snapshot_check(bs, bs->drv->snapshot_create != NULL, errp);
    return ret < 0 ? ret : bs->drv->snapshot_create(bs, name, errp);
}

int vd_amend(BlockNode *bs, const VdAmendOptions *opts, VdError **errp)
{
    if (!bs->drv->amend) {
        vd_error_setg(errp, ENOTSUP, "Format driver '%s' does not support option amendment",
                      bs->drv->name);
        return -ENOTSUP;
    }
    if (bs->read_only) {
        vd_error_setg(errp, EPERM, "'%s' is opened read-only", bs->filename);
        return -EPERM;
    }
    return bs->drv->amend(bs, opts, errp);
}

int vd_snapshot_goto(BlockNode *bs, const char *id_or_name, VdError **errp)
{
    /* As QEMU: reverting would change data behind the bitmaps' backs */
    if (vd_bitmaps_any(bs)) {
        vd_error_setg(errp, EBUSY, "Device has active dirty bitmaps");
        return -EBUSY;
    }
    int ret = snapshot_check(bs, bs->drv->snapshot_goto != NULL, errp);
    return ret < 0 ? ret : bs->drv->snapshot_goto(bs, id_or_name, errp);
}

int vd_snapshot_delete(BlockNode *bs, const char *id, const char *name, VdError **errp)
{
    int ret = snapshot_check(bs, bs->drv->snapshot_delete != NULL, errp);
    return ret < 0 ? ret : bs->drv->snapshot_delete(bs, id, name, errp);
}

int vd_chain_depth(BlockNode *top, BlockNode *layer)
{
    int d = 0;
    for (BlockNode *p = top; p; p = p->backing, d++) {
        if (p == layer) {
            return d;
        }
    }
    return -1;
}

BlockNode *vd_chain_bottom(BlockNode *top)
{
    BlockNode *p = top;
    while (p && p->backing) {
        p = p->backing;
    }
    return p;
}

static bool same_host_file(const char *a, const char *b)
{
    if (vd_filename_is_uri(a) || vd_filename_is_uri(b)) {
        return false;
    }
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

BlockNode *vd_chain_find(BlockNode *top, const char *name_or_file)
{
    if (!name_or_file) {
        return NULL;
    }
    /* Exact names first: node names, then filenames as given or as recorded by the parent. */
    for (BlockNode *p = top; p; p = p->backing) {
        if (p->node_name && !strcmp(p->node_name, name_or_file)) {
            return p;
        }
    }
    for (BlockNode *p = top; p; p = p->backing) {
        if (!strcmp(p->filename, name_or_file)) {
            return p;
        }
        if (p->backing && ((p->backing_file && !strcmp(p->backing_file, name_or_file)) ||
                           (p->full_backing_filename &&
                            !strcmp(p->full_backing_filename, name_or_file)))) {
            return p->backing;
        }
    }
    /* Then the same host file under another spelling, relative to the cwd... */
    for (BlockNode *p = top; p; p = p->backing) {
        if (same_host_file(p->filename, name_or_file)) {
            return p;
        }
    }
    /* ...or relative to the directory of the image that names it (as qemu-img does). */
    for (BlockNode *p = top; p && p->backing; p = p->backing) {
        char *r = vd_resolve_backing_path(p->filename, name_or_file);
        bool same = r && same_host_file(r, p->backing->filename);
        free(r);
        if (same) {
            return p->backing;
        }
    }
    return NULL;
}
