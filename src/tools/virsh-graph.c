/*
 * virsh-graph.c - resolving a virsh "disk" (export id, node name, filename, NAME[N]) and walking
 * backing chains in a snapshot of query-block-exports + query-named-block-nodes. Read-only: no
 * QMP command here changes server state.
 */
#include <assert.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tools/tool.h"
#include "tools/virsh-int.h"

/* ------------------------------------------------------- graph lookups */


void vs_graph_free(Graph *g)
{
    json_decref(g->exports);
    json_decref(g->nodes);
    g->exports = g->nodes = NULL;
}

int vs_graph_load(QmpConn *c, Graph *g, VdError **errp)
{
    g->exports = qmpc_execute(c, "query-block-exports", NULL, errp);
    if (!g->exports) {
        return -1;
    }
    g->nodes = qmpc_execute(c, "query-named-block-nodes", NULL, errp);
    if (!g->nodes) {
        vs_graph_free(g);
        return -1;
    }
    return 0;
}

const char *vs_jstr(json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

/* The entry of ARRAY (nodes or exports) whose "node-name" is NAME (borrowed), or NULL. */
static json_t *entry_by_node_name(json_t *array, const char *name)
{
    size_t i;
    json_t *e;
    json_array_foreach(array, i, e) {
        const char *nn = vs_jstr(e, "node-name");
        if (nn && !strcmp(nn, name)) {
            return e;
        }
    }
    return NULL;
}

json_t *vs_node_by_name(Graph *g, const char *name)
{
    return entry_by_node_name(g->nodes, name);
}

static bool is_protocol_driver(const char *drv)
{
    return drv && (!strcmp(drv, "file") || !strcmp(drv, "host_device") ||
                   !strcmp(drv, "host_cdrom"));
}

/* Filters the daemon inserts above a disk while a job runs (QEMU's implicit nodes). */
static bool is_filter_driver(const char *drv)
{
    static const char *const filters[] = { "mirror_top", "commit_top", "copy-on-read",
                                           "throttle", "preallocate", "compress",
                                           "copy-before-write", "snapshot-access", NULL };
    for (int i = 0; drv && filters[i]; i++) {
        if (!strcmp(drv, filters[i])) {
            return true;
        }
    }
    return false;
}

static int node_depth(json_t *n)
{
    json_t *d = json_object_get(n, "backing_file_depth");
    return json_is_integer(d) ? (int)json_integer_value(d) : -1;
}

/* The full filename of n's backing image, or NULL if it has none. */
static const char *backing_filename(json_t *n)
{
    json_t *bi = json_object_get(json_object_get(n, "image"), "backing-image");
    const char *f = bi ? vs_jstr(bi, "filename") : NULL;
    if (!f) {
        f = vs_jstr(n, "backing_file");
    }
    return f;
}

static bool is_exported(Graph *g, const char *node)
{
    return entry_by_node_name(g->exports, node) != NULL;
}

/*
 * The format node for image file `file` (depth hint >= 0 prefers the node at that chain depth,
 * as two nodes may open the same file). Exported nodes win ties.
 */
static json_t *node_by_file(Graph *g, const char *file, int depth, json_t *not_this)
{
    json_t *best = NULL;
    int best_score = -1;
    size_t i;
    json_t *n;
    json_array_foreach(g->nodes, i, n) {
        if (n == not_this || is_protocol_driver(vs_jstr(n, "drv")) ||
            is_filter_driver(vs_jstr(n, "drv")) || !vs_jstr(n, "node-name")) {
            continue;
        }
        if (!vs_same_file(vs_jstr(n, "file"), file)) {
            continue;
        }
        int score = 1;
        if (depth >= 0 && node_depth(n) == depth) {
            score += 2;
        }
        if (is_exported(g, vs_jstr(n, "node-name"))) {
            score += 1;
        }
        if (score > best_score) {
            best = n;
            best_score = score;
        }
    }
    return best;
}

/* The node backing n (NULL if none or not found among the named nodes). */
json_t *vs_backing_node(Graph *g, json_t *n)
{
    const char *bf = backing_filename(n);
    if (!bf) {
        return NULL;
    }
    int d = node_depth(n);
    return node_by_file(g, bf, d > 0 ? d - 1 : -1, n);
}

/*
 * A disk name -> its node entry (borrowed). Export id, node name, NAME[N], or image filename.
 * NULL with *errp (ENOENT) when nothing matches.
 */
/* Look through a job's filter node to the image node below it (same file name). */
json_t *vs_skip_filter(Graph *g, json_t *n)
{
    if (n && is_filter_driver(vs_jstr(n, "drv"))) {
        json_t *below = node_by_file(g, vs_jstr(n, "file"), node_depth(n), n);
        if (below) {
            return below;
        }
    }
    return n;
}

json_t *vs_resolve_disk(Graph *g, const char *disk, VdError **errp)
{
    size_t i;
    json_t *e;
    json_array_foreach(g->exports, i, e) {
        const char *id = vs_jstr(e, "id");
        if (id && !strcmp(id, disk)) {
            const char *en = vs_jstr(e, "node-name") ? vs_jstr(e, "node-name") : "";
            json_t *n = vs_node_by_name(g, en);
            if (n) {
                return vs_skip_filter(g, n);
            }
            /*
             * vdiskd does not list the filter it puts on top of a disk during a job
             * ("#mirror-top-disk0"): take the listed node whose name ends the export's.
             */
            size_t k;
            json_t *cand;
            json_array_foreach(g->nodes, k, cand) {
                const char *cn = vs_jstr(cand, "node-name");
                size_t cl = cn ? strlen(cn) : 0, el = strlen(en);
                if (cl && el > cl + 1 && en[el - cl - 1] == '-' && !strcmp(en + el - cl, cn)) {
                    return cand;
                }
            }
        }
    }
    json_t *n = vs_node_by_name(g, disk);
    if (n) {
        return n;
    }
    size_t len = strlen(disk);
    const char *lb = strrchr(disk, '[');
    if (len > 3 && disk[len - 1] == ']' && lb && lb != disk) {
        char *end;
        long idx = strtol(lb + 1, &end, 10);
        if (end == disk + len - 1 && idx >= 0 && end != lb + 1) {
            char *base = strndup(disk, (size_t)(lb - disk));
            if (!base) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                return NULL;
            }
            n = vs_resolve_disk(g, base, errp);
            free(base);
            for (long k = 0; n && k < idx; k++) {
                n = vs_backing_node(g, n);
            }
            if (!n && !*errp) {
                vd_error_setg(errp, ENOENT, "invalid path %s not assigned to a backing chain layer",
                              disk);
            }
            return n;
        }
    }
    n = node_by_file(g, disk, -1, NULL);
    if (n) {
        return n;
    }
    vd_error_setg(errp, ENOENT, "disk '%s' not found (no export, node or image of that name)",
                  disk);
    return NULL;
}

/*
 * A chain element named by the user (--base, --top): node, NAME[N] or a filename. Sets exactly
 * one of "<key>-node" (resolved) or "<key>" (unresolved filename: QEMU matches it in the chain).
 */
int vs_set_chain_arg(Graph *g, json_t *args, const char *key, const char *value)
{
    VdError *err = NULL;
    json_t *n = vs_resolve_disk(g, value, &err);
    char k[32];
    if (n) {
        snprintf(k, sizeof(k), "%s-node", key);
        return json_object_set_new(args, k, json_string(vs_jstr(n, "node-name")));
    }
    vd_error_free(err);
    char *abs = vs_absolute_path(value);
    if (!abs) {
        return -1;
    }
    int r = json_object_set_new(args, key, json_string(abs));
    free(abs);
    return r;
}

/*
 * --absolute-backing for blockcommit / blockpull: QEMU's "backing-file" set to the absolute name
 * of the base the job's arguments chose (base-node, base, or else the bottom of TOP's chain).
 * Without it the daemon decides (vdiskd: as the rewritten header names its backing now).
 */
int vs_set_absolute_backing(Graph *g, json_t *args, json_t *top)
{
    const char *bn = vs_jstr(args, "base-node");
    json_t *b = bn ? vs_node_by_name(g, bn) : NULL;
    const char *file = b ? vs_jstr(b, "file") : vs_jstr(args, "base");
    if (!file && !bn) {
        json_t *n = top;
        for (int i = 0; n && vs_backing_node(g, n) && i < 1000; i++) {
            n = vs_backing_node(g, n);
        }
        file = n && n != top ? vs_jstr(n, "file") : NULL;
    }
    if (!file) {
        return 0; /* no base: nothing is recorded */
    }
    char *abs = vs_absolute_path(file);
    int r = abs ? json_object_set_new(args, "backing-file", json_string(abs)) : -1;
    free(abs);
    return r;
}
