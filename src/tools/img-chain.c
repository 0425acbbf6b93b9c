/*
 * img-chain.c - commands that reshape backing chains: commit (push a layer's data down into a
 * base) and rebase (point an image at another backing file, copying what would change).
 * Each node is opened once, with exactly the write access it needs (base for commit, the top
 * image for rebase); everything else stays read-only. Messages follow qemu-img 7.2.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/tool.h"

#define SECTOR 512ull
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* Open flags for -t CACHE: none/directsync bypass the page cache; unsafe never syncs. */
/* -t/-T as qemu-img: an unknown cache mode is an error (-1 after its message). */
static int cache_flags_or_error(const char *cache, const char *what, int *flags)
{
    if (tool_cache_flags(cache, flags) < 0) {
        tool_error("Invalid %scache option: %s", what, cache);
        return -1;
    }
    return 0;
}

/* ================================ commit ================================ */

typedef struct Layer {
    char *filename;
    char *format;
} Layer;

static void layers_free(Layer *l, int n)
{
    for (int i = 0; i < n; i++) {
        free(l[i].filename);
        free(l[i].format);
    }
    free(l);
}

/* A chunk read from the top, written to base on the worker while the next one is read. */
typedef struct CommitWrite {
    BlockNode *base;
    uint64_t off, n;
    const uint8_t *buf;
} CommitWrite;

static int commit_write_task(void *arg)
{
    CommitWrite *w = arg;
    return vd_pwrite(w->base, w->off, w->n, w->buf, 0);
}

/* Block status of [off, len) of top above base; a failure is reported (-1). */
static int commit_status(BlockNode *top, BlockNode *base, uint64_t off, uint64_t len,
                         uint64_t *n, VdBlockStatus *st)
{
    int r = vd_block_status_above(top, base, off, len - off, n, st);
    if (r < 0 || *n == 0) {
        tool_error("Block status failed at offset %" PRIu64 ": %s", off,
                   strerror(r < 0 ? -r : EIO));
        return -1;
    }
    return 0;
}

int img_commit(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *base_name = NULL, *cache = "writeback";
    bool keep = false, progress = false, quiet = false;
    uint64_t rate = 0;
    ToolRate rl;
    int c;
    while ((c = getopt_long(argc, argv, ":f:ht:b:dpqr:", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 't': cache = optarg; break;
        case 'b': base_name = optarg; keep = true; break; /* -b implies -d, as in qemu-img */
        case 'd': keep = true; break;
        case 'p': progress = true; break;
        case 'q': quiet = true; break;
        case 'r':
            if (tool_parse_rate(optarg, &rate) < 0) {
                return 1;
            }
            break;
        case 'h': tool_print_usage("commit"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    if (quiet) {
        progress = false;
    }
    const char *filename = tool_one_image(argc, argv);
    if (!filename) {
        return 1;
    }
    int cache_flags;
    if (cache_flags_or_error(cache, "", &cache_flags) < 0) {
        return 1;
    }
    tool_rate_init(&rl, rate); /* destroyed at out: */

    /* 1. Discover the chain (no locks: nothing is read or written through these nodes). */
    BlockNode *probe = tool_open(filename, fmt, VD_OPEN_FORCE_SHARE);
    if (!probe) {
        return 1;
    }
    if (!probe->backing) {
        /* qemu-img opened the image read-write before finding out: so does this, quietly, for
         * the warnings such an open gives (a probed raw image's) */
        VdError *werr = NULL;
        vd_node_unref(vd_open_image(probe->filename, fmt, tool_open_flags(VD_OPEN_RDWR, false),
                                    &werr));
        vd_error_free(werr);
        tool_error("Image does not have a backing file");
        vd_node_unref(probe);
        return 1;
    }
    BlockNode *base_node = probe->backing;
    if (base_name) {
        base_node = vd_chain_find(probe->backing, base_name);
        if (!base_node) {
            tool_error("Did not find '%s' in the backing chain of '%s'", base_name, filename);
            vd_node_unref(probe);
            return 1;
        }
    }
    int nlayers = vd_chain_depth(probe, base_node) + 1; /* top .. base inclusive */
    Layer *layers = calloc((size_t)nlayers, sizeof(*layers));
    if (!layers) {
        tool_error("out of memory");
        vd_node_unref(probe);
        return 1;
    }
    int i = 0;
    for (BlockNode *p = probe; p && i < nlayers; p = p->backing, i++) {
        layers[i].filename = strdup(p->filename);
        layers[i].format = strdup(p->drv->name);
        if (!layers[i].filename || !layers[i].format) {
            tool_error("out of memory");
            vd_node_unref(probe);
            layers_free(layers, nlayers);
            return 1;
        }
    }
    vd_node_unref(probe);

    /* 2. Open base read-write (with its own chain), then the layers above it onto it. */
    int ret = 1;
    VdError *err = NULL;
    uint8_t *bufs[2] = {NULL, NULL};
    ToolWorker *worker = NULL;
    CommitWrite wt = {0};
    bool writing = false; /* wt is on the worker */
    BlockNode *top = NULL;
    BlockNode *base = vd_open_image(layers[nlayers - 1].filename, layers[nlayers - 1].format,
                                    tool_open_flags(VD_OPEN_RDWR | cache_flags, false), &err);
    if (!base) {
        tool_report(err, NULL);
        goto out;
    }
    BlockNode *below = base;
    vd_node_ref(below);
    for (i = nlayers - 2; i >= 0; i--) {
        VdOpenOptions oo = {
            .filename = layers[i].filename,
            .format = layers[i].format,
            .flags = tool_open_flags((i == 0 && !keep ? VD_OPEN_RDWR : 0) | cache_flags, false),
            .backing = below,
        };
        BlockNode *n = vd_open(&oo, &err);
        vd_node_unref(below);
        if (!n) {
            tool_report(err, NULL);
            goto out;
        }
        below = n;
    }
    top = below;

    /* 3. Copy everything allocated above base into base. */
    int64_t top_len = vd_getlength(top), base_len = vd_getlength(base);
    if (top_len < 0 || base_len < 0) {
        tool_error("Could not get the image size");
        goto out;
    }
    if (base_len < top_len) {
        if (vd_truncate(base, (uint64_t)top_len, false, VD_PREALLOC_OFF, &err) < 0) {
            tool_report(err, "Could not resize the base image");
            goto out;
        }
    }
    bufs[0] = malloc(TOOL_BUF_SIZE);
    bufs[1] = malloc(TOOL_BUF_SIZE);
    worker = tool_worker_new();
    if (!bufs[0] || !bufs[1] || !worker) {
        tool_error("out of memory");
        goto out;
    }
    int cur = 0;
    progress_init(progress, 1.0);
    progress_print(0, 100);
    uint64_t len = (uint64_t)top_len;
    int zflags = base->backing ? 0 : VD_REQ_MAY_UNMAP;
    /* -r: what commit writes into base (its data and zeroes), as qemu-img's job speed. */
    uint64_t chunk = tool_rate_chunk(&rl, TOOL_BUF_SIZE);
    /*
     * -p weighs by what is written into base, as qemu-img's commit job (a mirror of what is
     * allocated above base) does: a first pass counts it, and a range left alone adds nothing.
     */
    uint64_t work = 0, done = 0;
    for (uint64_t off = 0; progress && off < len;) {
        VdBlockStatus st;
        uint64_t n;
        if (commit_status(top, base, off, len, &n, &st) < 0) {
            goto out_progress;
        }
        work += st.flags & (VD_BS_ALLOCATED | VD_BS_ZERO) ? n : 0;
        off += n;
    }
    for (uint64_t off = 0; off < len;) {
        VdBlockStatus st;
        uint64_t n;
        int r = commit_status(top, base, off, len, &n, &st);
        if (r < 0) {
            goto out_progress;
        }
        /*
         * ZERO without ALLOCATED means a layer above base ends before this range: the top
         * reads zeroes there, so base must too (as qemu-img commit does).
         */
        if (st.flags & (VD_BS_ALLOCATED | VD_BS_ZERO)) {
            uint64_t eoff = off; /* where a failure is reported */
            if (rate) {
                n = MIN(n, chunk);
                tool_rate_wait(&rl, n);
            }
            if (st.flags & VD_BS_ZERO) {
                r = vd_pwrite_zeroes(base, off, n, zflags);
            } else {
                n = MIN(n, TOOL_BUF_SIZE);
                r = vd_pread(top, off, n, bufs[cur]);
                if (r == 0 && writing) {
                    writing = false;
                    eoff = wt.off;
                    r = tool_worker_wait(worker);
                }
                if (r == 0) {
                    wt = (CommitWrite){base, off, n, bufs[cur]};
                    tool_worker_submit(worker, commit_write_task, &wt);
                    writing = true;
                    cur ^= 1;
                }
            }
            if (r < 0) {
                tool_error("Commit failed at offset %" PRIu64 ": %s", eoff, strerror(-r));
                goto out_progress;
            }
            done += n;
            if (work) { /* 0 when not under -p */
                progress_print(100.0f * (float)done / (float)work, 0);
            }
        }
        off += n;
    }
    int r = writing ? tool_worker_wait(worker) : 0;
    writing = false;
    if (r < 0) {
        tool_error("Commit failed at offset %" PRIu64 ": %s", wt.off, strerror(-r));
        goto out_progress;
    }
    r = vd_flush(base);
    if (r < 0) {
        tool_error("Could not flush the base image: %s", strerror(-r));
        goto out_progress;
    }
    /* 4. Empty the top image: its data now lives in base, which it reads through. */
    if (!keep) {
        r = vd_pdiscard(top, 0, len, VD_REQ_FULL_DISCARD);
        if (r == 0) {
            r = vd_flush(top);
        }
        if (r < 0) {
            progress_end();
            tool_error("Image committed, but could not empty the top image: %s", strerror(-r));
            goto out;
        }
    }
    progress_print(100, 0);
    progress_end();
    if (!quiet) {
        printf("Image committed.\n");
    }
    ret = 0;
    goto out;
out_progress:
    progress_end();
out:
    tool_worker_free(worker); /* waits for a write still running */
    free(bufs[0]);
    free(bufs[1]);
    if (top) {
        vd_node_unref(top);
    }
    if (base) {
        vd_node_unref(base);
    }
    layers_free(layers, nlayers);
    tool_rate_destroy(&rl);
    return ret;
}

/* ================================ rebase ================================ */

/* Does [off, off+n) of chain bs read as zeroes per block status? (*pnum = extent length) */
static bool chain_reads_zero(BlockNode *bs, int64_t blen, uint64_t off, uint64_t n,
                             uint64_t *pnum)
{
    if (!bs || off >= (uint64_t)blen) {
        *pnum = n;
        return true;
    }
    VdBlockStatus st;
    uint64_t p;
    if (vd_block_status_above(bs, NULL, off, MIN(n, (uint64_t)blen - off), &p, &st) < 0 ||
        p == 0) {
        *pnum = n;
        return false;
    }
    *pnum = p;
    return (st.flags & VD_BS_ZERO) || !(st.flags & VD_BS_ALLOCATED);
}

/*
 * The image's current backing chain, opened on its own (src_flags: -T, -U). A backing file
 * without a recorded format is never probed unless --allow-probe: vd_open's message then.
 */
static BlockNode *open_old_backing(BlockNode *bs, int src_flags)
{
    VdError *err = NULL;
    BlockNode *old = NULL;
    if (!bs->backing_format && !(src_flags & VD_OPEN_ALLOW_PROBE)) {
        BlockNode *chain = vd_open_image(bs->filename, bs->drv->name, src_flags, &err);
        if (chain) { /* only reached if the driver found a format after all */
            old = chain->backing;
            if (old) {
                vd_node_ref(old);
            }
            vd_node_unref(chain);
            return old;
        }
        tool_report(err, NULL);
        return NULL;
    }
    old = vd_open_image(bs->full_backing_filename, bs->backing_format, src_flags, &err);
    if (!old) {
        tool_error("Could not open old backing file '%s': %s", bs->full_backing_filename,
                   vd_error_msg(err));
        vd_error_free(err);
    }
    return old;
}

/* One extent of a safe rebase: the old and new backings' contents at [off, off+n). */
typedef struct RebaseSlot {
    BlockNode *bs;
    uint64_t off, n;
    bool old_is_zero;
    uint8_t *buf_old, *buf_new;
} RebaseSlot;

/*
 * Writer task: where the old backing's content differs from the new one's, write the old
 * content into the image (zeroes past the old backing's end), in runs of 512-byte sectors.
 */
static int rebase_write_task(void *arg)
{
    RebaseSlot *sl = arg;
    uint64_t i = 0, n = sl->n;
    while (i < n) {
        uint64_t l = MIN(SECTOR, n - i);
        bool differ = memcmp(sl->buf_old + i, sl->buf_new + i, l) != 0;
        uint64_t j = i + l;
        while (j < n) {
            uint64_t l2 = MIN(SECTOR, n - j);
            if ((memcmp(sl->buf_old + j, sl->buf_new + j, l2) != 0) != differ) {
                break;
            }
            j += l2;
        }
        if (differ) {
            int r = sl->old_is_zero ? vd_pwrite_zeroes(sl->bs, sl->off + i, j - i, 0)
                                    : vd_pwrite(sl->bs, sl->off + i, j - i, sl->buf_old + i, 0);
            if (r < 0) {
                return r;
            }
        }
        i = j;
    }
    return 0;
}

int img_rebase(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *new_name = NULL, *new_fmt = NULL, *cache = "writeback";
    const char *src_cache = "writeback";
    bool unsafe = false, progress = false, quiet = false, force_share = false;
    int c;
    while ((c = getopt_long(argc, argv, ":hf:F:b:upt:T:qU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'F': new_fmt = optarg; break;
        case 'b': new_name = optarg; break;
        case 'u': unsafe = true; break;
        case 'p': progress = true; break;
        case 't': cache = optarg; break;
        case 'T': src_cache = optarg; break;
        case 'q': quiet = true; break;
        case 'U': force_share = true; break;
        case 'h': tool_print_usage("rebase");
            return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    if (quiet) {
        progress = false;
    }
    const char *filename = tool_one_image(argc, argv);
    if (!filename) {
        return 1;
    }
    if (!new_name && !unsafe) {
        tool_usage_error("Must specify backing file (-b) or use unsafe mode (-u)");
        return 1;
    }
    /* -u alone drops the backing file name, as qemu-img's (whose messages then say "(null)") */
    const char *shown_name = new_name ? new_name : "(null)";
    if (!new_name) {
        new_name = "";
    }
    bool flatten = new_name[0] == '\0';
    /* qemu-img shows 0 % before opening anything, and 100 % once the name is changed or not */
    progress_init(progress, 2.0);
    progress_print(0, 100);
    int cache_flags, src_flags;
    if (cache_flags_or_error(cache, "", &cache_flags) < 0 ||
        cache_flags_or_error(src_cache, "source ", &src_flags) < 0) {
        progress_end();
        return 1;
    }
    /* The backing files (old and new) are opened with -T and -U, as qemu-img does. */
    src_flags = tool_open_flags(src_flags, force_share);
    BlockNode *bs = tool_open(filename, fmt, VD_OPEN_RDWR | cache_flags | VD_OPEN_NO_BACKING);
    if (!bs) {
        progress_end();
        return 1;
    }
    /* after the open, as qemu-img finds these */
    if (new_fmt && !vd_find_driver(new_fmt)) {
        tool_error("Invalid format name: '%s'", new_fmt);
        vd_node_unref(bs);
        progress_end();
        return 1;
    }
    if (!flatten && !new_fmt) {
        /* qemu-img finds this when it changes the name, after any copying: then 100 % */
        tool_error("Could not change the backing file to '%s': backing format must be "
                   "specified", new_name);
        vd_node_unref(bs);
        progress_print(100, 0);
        progress_end();
        return 1;
    }
    if (!unsafe && bs->backing_file && bs->backing_file[0]) {
        BlockNode *old = open_old_backing(bs, src_flags);
        if (!old) {
            vd_node_unref(bs);
            progress_end();
            return 1;
        }
        vd_node_set_backing(bs, old);
        vd_node_unref(old);
    }
    int ret = 1;
    VdError *err = NULL;
    BlockNode *newb = NULL;  /* our reference to the new backing (safe mode) */
    BlockNode *prefix = NULL; /* new backing found inside the old chain */
    RebaseSlot slot[2] = { 0 }; /* double buffering: one read here, one written by writer */
    ToolWorker *worker = NULL, *writer = NULL;
    char *newpath = NULL;

    if (!unsafe) {
        if (!flatten) {
            newpath = vd_resolve_backing_path(bs->filename, new_name);
            if (!newpath) {
                tool_error("out of memory");
                goto out;
            }
            /* Rebasing onto a layer of the current chain: only what lies between changes. */
            if (bs->backing) {
                prefix = vd_chain_find(bs->backing, newpath);
                if (prefix && strcmp(prefix->drv->name, new_fmt)) {
                    prefix = NULL;
                }
            }
            if (prefix) {
                newb = prefix;
                vd_node_ref(newb);
            } else {
                newb = vd_open_image(newpath, new_fmt, src_flags, &err);
                if (!newb) {
                    tool_error("Could not open new backing file '%s': %s", newpath,
                               vd_error_msg(err));
                    vd_error_free(err);
                    err = NULL;
                    goto out;
                }
            }
        }
        int64_t size = vd_getlength(bs);
        int64_t old_size = bs->backing ? vd_getlength(bs->backing) : 0;
        int64_t new_size = newb ? vd_getlength(newb) : 0;
        if (size < 0 || old_size < 0 || new_size < 0) {
            tool_error("Could not get the image sizes");
            goto out;
        }
        for (int k = 0; k < 2; k++) {
            slot[k].bs = bs;
            slot[k].buf_old = malloc(TOOL_BUF_SIZE);
            slot[k].buf_new = malloc(TOOL_BUF_SIZE);
        }
        worker = tool_worker_new();
        writer = tool_worker_new();
        if (!slot[0].buf_old || !slot[0].buf_new || !slot[1].buf_old || !slot[1].buf_new ||
            !worker || !writer) {
            tool_error("out of memory");
            goto out;
        }
        /*
         * qemu-img's steps: each piece it reads (not allocated in the image and, with a prefix,
         * allocated above it; at most 2 MiB) adds 100 / (size / 2 MiB) %, however long it is.
         */
        uint64_t usize = (uint64_t)size, stepped_to = 0;
        float step = usize ? 100.0f / (float)(usize / MIN(usize, TOOL_BUF_SIZE)) : 0;
        int cur = 0;
        bool writing = false; /* the writer holds slot[!cur] */
        for (uint64_t off = 0; off < (uint64_t)size;) {
            uint64_t n = MIN(TOOL_BUF_SIZE, (uint64_t)size - off);
            VdBlockStatus st;
            uint64_t pn;
            /* Allocated in the image itself: its content does not depend on the backing. */
            int r = vd_block_status(bs, off, n, &pn, &st);
            if (r < 0 || pn == 0) {
                tool_error("error while reading image metadata: %s", strerror(r < 0 ? -r : EIO));
                goto out;
            }
            n = pn;
            if (st.flags & VD_BS_ALLOCATED) {
                off += n;
                continue;
            }
            if (prefix && off < (uint64_t)old_size) {
                n = MIN(n, (uint64_t)old_size - off);
                r = vd_block_status_above(bs->backing, prefix, off, n, &pn, &st);
                if (r < 0 || pn == 0) {
                    tool_error("error while reading image metadata: %s",
                               strerror(r < 0 ? -r : EIO));
                    goto out;
                }
                n = pn;
                if (!(st.flags & VD_BS_ALLOCATED)) {
                    off += n; /* nothing between the old and new backing: same data */
                    continue;
                }
            }
            bool stepping = off >= stepped_to; /* a piece qemu-img reads starts here */
            stepped_to = stepping ? off + n : stepped_to;
            /* Both read zero: nothing to do. */
            uint64_t z1, z2;
            bool zo = chain_reads_zero(bs->backing, old_size, off, n, &z1);
            bool zn = chain_reads_zero(newb, new_size, off, n, &z2);
            if (zo && zn) {
                off += MIN(z1, z2);
                if (stepping) {
                    progress_print(step, 100);
                }
                continue;
            }
            /*
             * The two backings are read at once (the copies out of the page cache dominate),
             * while the writer compares and writes the previous extent from the other slot.
             */
            RebaseSlot *sl = &slot[cur];
            sl->off = off;
            sl->n = n;
            sl->old_is_zero = !bs->backing || off >= (uint64_t)old_size;
            ToolRead rn = {newb, new_size, off, n, sl->buf_new};
            ToolRead ro = {bs->backing, old_size, off, n, sl->buf_old};
            tool_worker_submit(worker, tool_read_task, &rn);
            r = tool_read_task(&ro);
            int r2 = tool_worker_wait(worker);
            r = r < 0 ? r : r2;
            if (r < 0) {
                tool_error("error while reading from backing file: %s", strerror(-r));
                goto out;
            }
            if (writing && (r = tool_worker_wait(writer)) < 0) {
                writing = false;
                tool_error("error while writing to the image: %s", strerror(-r));
                goto out;
            }
            tool_worker_submit(writer, rebase_write_task, sl);
            writing = true;
            cur = !cur;
            off += n;
            if (stepping) {
                progress_print(step, 100);
            }
        }
        if (writing) {
            writing = false;
            int r = tool_worker_wait(writer);
            if (r < 0) {
                tool_error("error while writing to the image: %s", strerror(-r));
                goto out;
            }
        }
    }

    if (vd_change_backing_file(bs, flatten ? NULL : new_name, flatten ? NULL : new_fmt,
                               &err) < 0) {
        /* qemu-img's words: the errno's, or its own for a header with no room for the name */
        int code = vd_error_code(err);
        tool_error("Could not change the backing file to '%s': %s", shown_name,
                   code == ENOSPC ? "No space left in the file header" : strerror(code));
        vd_error_free(err);
        progress_print(100, 0);
        goto out;
    }
    progress_print(100, 0);
    int r = vd_flush(bs);
    if (r < 0) {
        tool_error("Could not flush the image: %s", strerror(-r));
        goto out;
    }
    ret = 0;
out:
    progress_end();
    tool_worker_free(writer); /* waits for a write still running */
    tool_worker_free(worker);
    for (int k = 0; k < 2; k++) {
        free(slot[k].buf_old);
        free(slot[k].buf_new);
    }
    free(newpath);
    if (newb) {
        vd_node_unref(newb);
    }
    vd_node_unref(bs);
    return ret;
}
