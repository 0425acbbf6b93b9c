/*
 * virsh-blockjob.c - `vdisk blockjob`: show (query-block-jobs), --abort/--pivot
 * (block-job-cancel/-complete) and --bandwidth (block-job-set-speed) a disk's job, as virsh;
 * --resume (block-job-resume, a vdisk extension) continues a paused one, e.g. a copy vdiskd
 * offered back after a restart (docs/resumable.md).
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

/* -------------------------------------------------------------- blockjob */

/* virsh's job-type labels (virshDomainBlockJobToString) from QMP's JobType. */
static const char *job_label(const char *type)
{
    if (!type) {
        return "Unknown job";
    }
    if (!strcmp(type, "stream")) {
        return "Block Pull";
    }
    if (!strcmp(type, "mirror")) {
        return "Block Copy";
    }
    if (!strcmp(type, "commit")) {
        return "Block Commit";
    }
    if (!strcmp(type, "backup")) {
        return "Backup";
    }
    return "Unknown job";
}

/* virsh --raw type names (virshDomainBlockJobTypeToString). */
static const char *job_raw_type(const char *type)
{
    if (type && !strcmp(type, "stream")) {
        return "Pull";
    }
    if (type && !strcmp(type, "mirror")) {
        return "Copy";
    }
    if (type && !strcmp(type, "commit")) {
        return "Commit";
    }
    if (type && !strcmp(type, "backup")) {
        return "Backup";
    }
    return "Unknown";
}

/* virsh's vshPrettyCapacity. */
static double pretty_capacity(uint64_t val, const char **unit)
{
    static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
    if (val < 1024) {
        *unit = "B";
        return (double)val;
    }
    double v = (double)val / 1024.0;
    int i = 0;
    while (v >= 1024.0 && i < 5) {
        v /= 1024.0;
        i++;
    }
    *unit = units[i];
    return v;
}

/* A byte count or rate the way virsh prints capacities ("12.000 MiB"). */
static void print_capacity(const char *label, uint64_t v, const char *suffix)
{
    const char *unit;
    double val = pretty_capacity(v, &unit);
    printf(", %s %.3f %s%s", label, val, unit, suffix);
}

/*
 * blockjob --verbose: the job's phase, what is dirty, copy and dirty rates and the time to READY
 * (vdiskd's query-block-jobs extensions; a daemon without them shows its status only).
 */
static void print_job_details(json_t *job)
{
    const char *phase = vs_jstr(job, "vdisk-phase");
    const char *status = vs_jstr(job, "status");
    printf("    Phase: %s", phase ? phase : status ? status : "unknown");
    json_t *dirty = json_object_get(job, "vdisk-dirty-bytes");
    json_t *crate = json_object_get(job, "vdisk-copy-rate");
    json_t *drate = json_object_get(job, "vdisk-dirty-rate");
    json_t *eta = json_object_get(job, "vdisk-eta-ready");
    if (json_is_integer(dirty)) {
        print_capacity("dirty", (uint64_t)json_integer_value(dirty), "");
    }
    if (json_is_integer(crate)) {
        print_capacity("copy rate", (uint64_t)json_integer_value(crate), "/s");
    }
    if (json_is_integer(drate)) {
        print_capacity("dirty rate", (uint64_t)json_integer_value(drate), "/s");
    }
    if (json_is_integer(eta)) {
        printf(", ready in %" PRId64 " s", (int64_t)json_integer_value(eta));
    } else if (json_is_integer(crate)) {
        printf(", ready: unknown");
    }
    json_t *synced = json_object_get(job, "actively-synced");
    if (json_is_boolean(synced)) {
        printf(", actively synced: %s", json_is_true(synced) ? "yes" : "no");
    }
    printf("\n");
}

/*
 * The job of a mirror whose filter an export with id DISK serves: vdiskd names the filter
 * "#mirror-top-<job id>" and does not list it among the nodes (NULL: none such).
 */
static const char *filter_job_id(Graph *g, const char *disk)
{
    static const char prefix[] = "#mirror-top-";
    size_t i;
    json_t *e;
    json_array_foreach(g->exports, i, e) {
        const char *id = vs_jstr(e, "id"), *en = vs_jstr(e, "node-name");
        if (id && en && !strcmp(id, disk) && !strncmp(en, prefix, sizeof(prefix) - 1)) {
            return en + sizeof(prefix) - 1;
        }
    }
    return NULL;
}

/*
 * The job running on this disk: our id for its node, the node name itself, or DISK verbatim; else
 * a job with an id of its own that works on the disk's node (query-block-jobs "vdisk-node") or
 * whose filter DISK's export serves.
 */
static json_t *find_disk_job(QmpConn *c, Graph *g, const char *disk, json_t *node,
                             VdError **errp)
{
    json_t *jobs = qmpc_execute(c, "query-block-jobs", NULL, errp);
    if (!jobs) {
        return NULL;
    }
    const char *nodename = node ? vs_jstr(node, "node-name") : NULL;
    char *ours = nodename ? vs_job_id_for(nodename) : NULL;
    const char *cands[] = { ours, nodename, disk, filter_job_id(g, disk), nodename };
    json_t *found = NULL;
    for (int k = 0; k < 5 && !found; k++) {
        size_t i;
        json_t *j;
        if (!cands[k]) {
            continue;
        }
        json_array_foreach(jobs, i, j) {
            const char *dev = vs_jstr(j, k < 4 ? "device" : "vdisk-node");
            if (dev && !strcmp(dev, cands[k])) {
                found = json_incref(j);
                break;
            }
        }
    }
    free(ours);
    json_decref(jobs);
    if (!found) {
        vd_error_setg(errp, ENOENT, "No current block job for %s", disk);
    }
    return found;
}

int virsh_blockjob(int argc, char **argv)
{
    const char *sock = NULL, *bw = NULL;
    bool info = false, abort_ = false, async = false, pivot = false, bytes = false, raw = false;
    bool verbose = false, resume = false;
    const VOpt opts[] = {
        { "socket", NULL, &sock, NULL },
        { "info", &info, NULL, NULL },
        { "verbose", &verbose, NULL, NULL },
        { "abort", &abort_, NULL, NULL },
        { "async", &async, NULL, NULL },
        { "pivot", &pivot, NULL, NULL },
        { "bandwidth", NULL, &bw, NULL },
        { "bytes", &bytes, NULL, NULL },
        { "raw", &raw, NULL, NULL },
        { "resume", &resume, NULL, NULL },
        { NULL, NULL, NULL, NULL }
    };
    static const char *const names[] = { "disk" };
    int p = vs_parse_opts(argc, argv, opts, 1, names);
    if (p <= 0) {
        return p < 0;
    }
    const char *disk = argv[optind];
    static const struct { const char *a, *b; } excl[] = {
        { "raw", "abort" }, { "raw", "pivot" }, { "raw", "async" }, { "raw", "bandwidth" },
        { "verbose", "abort" }, { "verbose", "pivot" }, { "verbose", "async" },
        { "verbose", "bandwidth" }, { "verbose", "raw" },
        { "info", "abort" }, { "info", "pivot" }, { "info", "async" }, { "info", "bandwidth" },
        { "bytes", "abort" }, { "bytes", "pivot" }, { "bytes", "async" },
        { "resume", "raw" }, { "resume", "info" }, { "resume", "bytes" }, { "resume", "abort" },
        { "resume", "pivot" }, { "resume", "async" }, { "resume", "bandwidth" },
        { "resume", "verbose" },
    };
    bool set[] = { raw, info, bytes, abort_, pivot, async, bw != NULL, verbose, resume };
    const char *setnames[] = { "raw", "info", "bytes", "abort", "pivot", "async", "bandwidth",
                               "verbose", "resume" };
    for (size_t i = 0; i < sizeof(excl) / sizeof(excl[0]); i++) {
        bool a = false, b = false;
        for (size_t k = 0; k < sizeof(set) / sizeof(set[0]); k++) {
            a = a || (set[k] && !strcmp(setnames[k], excl[i].a));
            b = b || (set[k] && !strcmp(setnames[k], excl[i].b));
        }
        if (a && b) {
            tool_error("error: Options --%s and --%s are mutually exclusive", excl[i].a,
                       excl[i].b);
            return 1;
        }
    }
    int64_t speed = 0;
    if (bw && vs_bandwidth_to_speed(bw, bytes, &speed) < 0) {
        return 1;
    }

    int ret = 1;
    QmpConn *conn = vs_open_conn(sock);
    Graph g = { 0 };
    char *fail_msg = NULL;
    json_t *job = NULL;
    VdError *err = NULL;
    if (!conn) {
        goto out;
    }
    json_t *node = NULL;
    if (vs_graph_load(conn, &g, &err) < 0) {
        vs_report(err, NULL);
        goto out;
    }
    node = vs_resolve_disk(&g, disk, &err);
    vd_error_free(err); /* a job id that is no disk is still worth looking up */
    err = NULL;
    job = find_disk_job(conn, &g, disk, node, &err);
    bool querying = !(bw || abort_ || pivot || async || resume);
    if (!job) {
        if (querying && vd_error_code(err) == ENOENT) {
            /* virsh: not an error for --info */
            printf("%s\n", vd_error_msg(err));
            vd_error_free(err);
            ret = 0;
        } else {
            vs_report(err, NULL);
        }
        goto out;
    }
    const char *id = vs_jstr(job, "device");
    if (bw) {
        json_t *r = qmpc_execute(conn, "block-job-set-speed",
                                 json_pack("{s:s,s:I}", "device", id, "speed", (json_int_t)speed),
                                 &err);
        if (!r) {
            vs_report(err, NULL);
            goto out;
        }
        json_decref(r);
        printf("\n");
        ret = 0;
        goto out;
    }
    if (resume) {
        if (vs_job_verb(conn, "block-job-resume", id, disk, "resume") < 0) {
            goto out;
        }
        printf("\n");
        ret = 0;
        goto out;
    }
    if (abort_ || pivot || async) {
        if (vs_job_verb(conn, pivot ? "block-job-complete" : "block-job-cancel", id, disk,
                        pivot ? "pivot" : "abort") < 0) {
            goto out;
        }
        if (!async) {
            WaitResult w = vs_wait_end(conn, id, &fail_msg);
            if (w == WAIT_ERROR) {
                goto out;
            }
            if (w == WAIT_FAILED) {
                vs_fail_report(pivot ? "failed to pivot job" : "failed to abort job", fail_msg);
                fail_msg = NULL;
                goto out;
            }
        }
        printf("\n");
        ret = 0;
        goto out;
    }
    const char *type = vs_jstr(job, "type");
    uint64_t cur = (uint64_t)json_integer_value(json_object_get(job, "offset"));
    uint64_t end = (uint64_t)json_integer_value(json_object_get(job, "len"));
    uint64_t spd = (uint64_t)json_integer_value(json_object_get(job, "speed"));
    if (raw) {
        printf(" type=%s\n bandwidth=%" PRIu64 "\n cur=%" PRIu64 "\n end=%" PRIu64 "\n",
               job_raw_type(type), spd >> 20, cur, end);
    } else {
        vs_print_progress(job_label(type), end - cur, end);
        if (spd) {
            const char *unit;
            double val = pretty_capacity(spd, &unit);
            printf("    Bandwidth limit: %" PRIu64 " bytes/s (%-.3lf %s/s)", spd, val, unit);
        }
        printf("\n");
        if (verbose) {
            print_job_details(job);
        }
    }
    printf("\n");
    ret = 0;
out:
    fflush(stdout);
    free(fail_msg);
    json_decref(job);
    vs_graph_free(&g);
    qmpc_close(conn);
    return ret;
}
