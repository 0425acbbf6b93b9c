/*
 * virsh-snapshot.c - `vdisk snapshot-create`: an external disk-only snapshot of a disk via
 * blockdev-snapshot-sync, as virsh snapshot-create-as --disk-only.
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

/* ------------------------------------------------------- snapshot-create */

int virsh_snapshot_create(int argc, char **argv)
{
    const char *sock = NULL, *format = NULL, *node_name = NULL;
    bool reuse = false, absolute = false;
    const VOpt opts[] = {
        { "socket", NULL, &sock, NULL },
        { "format", NULL, &format, NULL },
        { "reuse-external", &reuse, NULL, NULL },
        { "absolute-backing", &absolute, NULL, NULL },
        { "node-name", NULL, &node_name, NULL },
        { NULL, NULL, NULL, NULL }
    };
    static const char *const names[] = { "disk", "overlay" };
    int p = vs_parse_opts(argc, argv, opts, 2, names);
    if (p <= 0) {
        return p < 0;
    }
    const char *disk = argv[optind], *overlay = argv[optind + 1];
    int ret = 1;
    QmpConn *conn = NULL;
    Graph g = { 0 };
    char *file = NULL;
    json_t *node = vs_setup(sock, disk, &conn, &g);
    if (!node) {
        goto out;
    }
    file = vs_absolute_path(overlay);
    json_t *args = json_pack("{s:s,s:s}", "node-name", vs_jstr(node, "node-name"),
                             "snapshot-file", file ? file : overlay);
    if (!file || !args) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    /* Without a mode vdiskd records the old top relative to the overlay (QEMU: absolute). */
    if (reuse || absolute) {
        json_object_set_new(args, "mode", json_string(reuse ? "existing" : "absolute-paths"));
    }
    if (format) {
        json_object_set_new(args, "format", json_string(format));
    }
    /* QEMU requires a name for the overlay node when the disk is named by node: pick a free one. */
    char auto_name[32];
    if (!node_name) {
        for (int k = 0; k < 100000; k++) {
            snprintf(auto_name, sizeof(auto_name), "snap%d", k);
            if (!vs_node_by_name(&g, auto_name)) {
                break;
            }
        }
        node_name = auto_name;
    }
    json_object_set_new(args, "snapshot-node-name", json_string(node_name));
    VdError *err = NULL;
    json_t *r = qmpc_execute(conn, "blockdev-snapshot-sync", args, &err);
    if (!r) {
        vs_report(err, NULL);
        goto out;
    }
    json_decref(r);
    printf("Disk snapshot %s created\n", overlay);
    ret = 0;
out:
    fflush(stdout);
    free(file);
    vs_graph_free(&g);
    qmpc_close(conn);
    return ret;
}
