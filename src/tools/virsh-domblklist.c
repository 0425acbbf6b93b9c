/*
 * virsh-domblklist.c - `vdisk domblklist`: the table of exported disks and their sources from
 * query-block-exports + query-named-block-nodes, formatted as virsh domblklist.
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

/* ------------------------------------------------------------ domblklist */

typedef struct Table {
    int ncols, nrows, cap;
    char **cells; /* row-major; row 0 = header */
} Table;

static int table_add(Table *t, const char *const *row)
{
    if (t->nrows == t->cap) {
        int ncap = t->cap ? t->cap * 2 : 16;
        char **nc = realloc(t->cells, sizeof(char *) * (size_t)ncap * (size_t)t->ncols);
        if (!nc) {
            return -1;
        }
        t->cells = nc;
        t->cap = ncap;
    }
    for (int i = 0; i < t->ncols; i++) {
        t->cells[t->nrows * t->ncols + i] = strdup(row[i] ? row[i] : "-");
        if (!t->cells[t->nrows * t->ncols + i]) {
            for (int k = 0; k < i; k++) {
                free(t->cells[t->nrows * t->ncols + k]);
            }
            return -1;
        }
    }
    t->nrows++;
    return 0;
}

/* vshTable layout: " cell" + padding to the column width + 2; dashes = sum(width + 3). */
static void table_print(Table *t)
{
    size_t width[8] = { 0 };
    for (int r = 0; r < t->nrows; r++) {
        for (int i = 0; i < t->ncols; i++) {
            size_t l = strlen(t->cells[r * t->ncols + i]);
            if (l > width[i]) {
                width[i] = l;
            }
        }
    }
    for (int r = 0; r < t->nrows; r++) {
        for (int i = 0; i < t->ncols; i++) {
            const char *s = t->cells[r * t->ncols + i];
            printf(" %s", s);
            if (i < t->ncols - 1) {
                printf("%*s", (int)(width[i] - strlen(s) + 2), "");
            }
        }
        printf("\n");
        if (r == 0) {
            for (int i = 0; i < t->ncols; i++) {
                for (size_t k = 0; k < width[i] + 3; k++) {
                    putchar('-');
                }
            }
            printf("\n");
        }
    }
}

static void table_free(Table *t)
{
    for (int i = 0; i < t->nrows * t->ncols; i++) {
        free(t->cells[i]);
    }
    free(t->cells);
}

int virsh_domblklist(int argc, char **argv)
{
    const char *sock = NULL;
    bool details = false;
    bool inactive = false; /* virsh compatibility: a daemon has no inactive config */
    const VOpt opts[] = {
        { "socket", NULL, &sock, NULL },
        { "details", &details, NULL, NULL },
        { "inactive", &inactive, NULL, NULL },
        { NULL, NULL, NULL, NULL }
    };
    int p = vs_parse_opts(argc, argv, opts, -1, NULL);
    if (p <= 0) {
        return p < 0;
    }
    if (optind < argc) {
        tool_error("error: unexpected data '%s'", argv[optind]);
        return 1;
    }
    int ret = 1;
    Graph g = { 0 };
    Table t = { .ncols = details ? 4 : 2 };
    VdError *err = NULL;
    QmpConn *conn = vs_open_conn(sock);
    if (!conn) {
        goto out;
    }
    if (vs_graph_load(conn, &g, &err) < 0) {
        vs_report(err, NULL);
        goto out;
    }
    static const char *const hdr2[] = { "Target", "Source" };
    static const char *const hdr4[] = { "Target", "Node", "Format", "Source" };
    if (table_add(&t, details ? hdr4 : hdr2) < 0) {
        goto oom;
    }
    size_t i;
    json_t *e;
    json_array_foreach(g.exports, i, e) {
        const char *id = vs_jstr(e, "id");
        const char *nn = vs_jstr(e, "node-name");
        json_t *n = nn ? vs_skip_filter(&g, vs_node_by_name(&g, nn)) : NULL;
        if (!details) {
            const char *row[] = { id, n ? vs_jstr(n, "file") : NULL };
            if (table_add(&t, row) < 0) {
                goto oom;
            }
            continue;
        }
        /* The chain, top first: "id", "id[1]", ... (libvirt's index notation). */
        int depth = 0;
        json_t *layer = n;
        json_t *img = n ? json_object_get(n, "image") : NULL;
        for (;;) {
            char target[256];
            if (depth) {
                snprintf(target, sizeof(target), "%s[%d]", id ? id : "-", depth);
            } else {
                snprintf(target, sizeof(target), "%s", id ? id : "-");
            }
            const char *src = layer ? vs_jstr(layer, "file")
                                    : (img ? vs_jstr(img, "filename") : NULL);
            const char *fmt = layer ? vs_jstr(layer, "drv") : (img ? vs_jstr(img, "format") : NULL);
            const char *row[] = { target, layer ? vs_jstr(layer, "node-name") : NULL, fmt, src };
            if (table_add(&t, row) < 0) {
                goto oom;
            }
            /* Follow the nested image info; match each layer to a named node when possible. */
            json_t *next_img = img ? json_object_get(img, "backing-image") : NULL;
            json_t *next_layer = layer ? vs_backing_node(&g, layer) : NULL;
            if (!next_img && !next_layer) {
                break;
            }
            img = next_img;
            layer = next_layer;
            if (++depth > 1000) {
                break; /* a cycle in what the server reported: stop */
            }
        }
    }
    table_print(&t);
    printf("\n");
    ret = 0;
    goto out;
oom:
    tool_error("error: out of memory");
out:
    fflush(stdout);
    table_free(&t);
    vs_graph_free(&g);
    qmpc_close(conn);
    return ret;
}
