/*
 * virsh-jobs.c - virsh-like online commands of `vdisk` (blockcopy, blockpull, blockcommit,
 * blockjob, snapshot-create, domblklist): one QMP connection each to vdiskd or any QEMU-compatible
 * daemon. Output follows virsh; errors are one "vdisk: error: ..." line and exit status 1 (also
 * for a job that failed or was aborted). Only the QMP commands named below change server state.
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
#include "tools/virsh.h"

/*
 * Conventions. Socket: --socket PATH, else $VDISK_SOCKET, else /run/vdisk/vdiskd.qmp.
 * Output as tools/virsh-domain.c: progress "\rLabel: [%5.2f %]" on stderr, messages on stdout,
 * then the newline virsh prints after every command.
 * A disk is an export id, a node name, an image filename, or NAME[N] (the N-th backing layer of
 * NAME, as libvirt's "vda[1]"). Jobs get the id of the disk's node (sanitised to QEMU's id rules),
 * so blockjob finds them; blockjob also finds a job whose id is the node name or DISK itself.
 * QMP mapping: blockcopy -> drive-mirror (+ block-job-complete / block-job-cancel for --pivot /
 * --finish), blockpull -> block-stream, blockcommit -> block-commit, blockjob -> query-block-jobs,
 * block-job-cancel, block-job-complete, block-job-set-speed, snapshot-create ->
 * blockdev-snapshot-sync, domblklist -> query-block-exports + query-named-block-nodes.
 */

/* Poll query-block-jobs this often for progress (virsh: 500 ms; events wake us earlier). */
#define POLL_MS 250
/* How long to wait for a job to end after a cancel / complete we sent. */
#define END_TIMEOUT_MS 60000

/* One long option of a command: a flag sets *flag; an option with a value stores optarg (or
 * FIXED, for an alias such as --raw = --format raw) in *value. Tables end with name == NULL. */
typedef struct {
    const char *name;
    bool *flag;
    const char **value;
    const char *fixed;
} VOpt;

#define VOPT_MAX 24
#define VOPT_HELP 1000

typedef enum {
    WAIT_ERROR = -1,
    WAIT_COMPLETED,
    WAIT_READY,
    WAIT_CANCELLED,
    WAIT_FAILED,
} WaitResult;

static volatile sig_atomic_t int_caught;

static void catch_int(int sig)
{
    (void)sig;
    int_caught = 1;
}

/* ---------------------------------------------------------------- helpers */

static void report(VdError *err, const char *what)
{
    if (what) {
        tool_error("error: %s: %s", what, vd_error_msg(err));
    } else {
        tool_error("error: %s", vd_error_msg(err));
    }
    vd_error_free(err);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static QmpConn *open_conn(const char *sock_opt)
{
    VdError *err = NULL;
    QmpConn *c = qmpc_connect(virsh_socket_path(sock_opt), &err);
    if (!c) {
        report(err, NULL);
    }
    return c;
}

/* virsh's message for a bad number. */
static int parse_num(const char *opt, const char *arg, uint64_t *out)
{
    if (tool_parse_uint(arg, out) < 0) {
        tool_error("error: Numeric value '%s' for <%s> option is malformed or out of range", arg,
                   opt);
        return -1;
    }
    return 0;
}

/* --bandwidth (MiB/s unless bytes) -> bytes/s for QMP "speed" (an int64). */
static int bandwidth_to_speed(const char *arg, bool bytes, int64_t *speed)
{
    uint64_t v;
    if (parse_num("bandwidth", arg, &v) < 0) {
        return -1;
    }
    uint64_t limit = bytes ? (uint64_t)INT64_MAX : ((uint64_t)INT64_MAX >> 20);
    if (v > limit) {
        tool_error("error: bandwidth must be less than %" PRIu64, limit);
        return -1;
    }
    *speed = (int64_t)(bytes ? v : v << 20);
    return 0;
}

/*
 * The daemon resolves relative file names against ITS working directory; the user means ours.
 * Names with ':' (json:, nbd:) pass unchanged. Returns a malloc'd string.
 */
static char *absolute_path(const char *p)
{
    if (p[0] == '/' || strchr(p, ':')) {
        return strdup(p);
    }
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof(cwd))) {
        return strdup(p);
    }
    char *out;
    if (asprintf(&out, "%s/%s", cwd, p) < 0) {
        return NULL;
    }
    return out;
}

/* The same file? (paths as given, or both resolvable to the same real path) */
static bool same_file(const char *a, const char *b)
{
    if (!a || !b) {
        return false;
    }
    if (!strcmp(a, b)) {
        return true;
    }
    char ra[PATH_MAX], rb[PATH_MAX];
    return realpath(a, ra) && realpath(b, rb) && !strcmp(ra, rb);
}

static bool id_char_ok(char ch, bool first)
{
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')) {
        return true;
    }
    return !first && ((ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_');
}

/* QEMU's job ids: a letter, then letters, digits, '-', '.', '_'. "#block12" -> "vdisk-block12". */
static char *job_id_for(const char *node)
{
    bool ok = node[0] != '\0';
    for (size_t i = 0; node[i]; i++) {
        if (!id_char_ok(node[i], i == 0)) {
            ok = false;
        }
    }
    if (ok) {
        return strdup(node);
    }
    size_t n = strlen(node);
    char *id = malloc(n + 8);
    if (!id) {
        return NULL;
    }
    strcpy(id, "vdisk-");
    size_t w = 6;
    for (size_t i = 0; i < n; i++) {
        if (node[i] == '#' && i == 0) {
            continue;
        }
        id[w++] = id_char_ok(node[i], false) ? node[i] : '_';
    }
    id[w] = '\0';
    return id;
}

/* ------------------------------------------------------- graph lookups */

typedef struct Graph {
    json_t *exports; /* query-block-exports */
    json_t *nodes;   /* query-named-block-nodes */
} Graph;

static void graph_free(Graph *g)
{
    json_decref(g->exports);
    json_decref(g->nodes);
    g->exports = g->nodes = NULL;
}

static int graph_load(QmpConn *c, Graph *g, VdError **errp)
{
    g->exports = qmpc_execute(c, "query-block-exports", NULL, errp);
    if (!g->exports) {
        return -1;
    }
    g->nodes = qmpc_execute(c, "query-named-block-nodes", NULL, errp);
    if (!g->nodes) {
        graph_free(g);
        return -1;
    }
    return 0;
}

static const char *jstr(json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

/* The entry of ARRAY (nodes or exports) whose "node-name" is NAME (borrowed), or NULL. */
static json_t *entry_by_node_name(json_t *array, const char *name)
{
    size_t i;
    json_t *e;
    json_array_foreach(array, i, e) {
        const char *nn = jstr(e, "node-name");
        if (nn && !strcmp(nn, name)) {
            return e;
        }
    }
    return NULL;
}

static json_t *node_by_name(Graph *g, const char *name)
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
    const char *f = bi ? jstr(bi, "filename") : NULL;
    if (!f) {
        f = jstr(n, "backing_file");
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
        if (n == not_this || is_protocol_driver(jstr(n, "drv")) ||
            is_filter_driver(jstr(n, "drv")) || !jstr(n, "node-name")) {
            continue;
        }
        if (!same_file(jstr(n, "file"), file)) {
            continue;
        }
        int score = 1;
        if (depth >= 0 && node_depth(n) == depth) {
            score += 2;
        }
        if (is_exported(g, jstr(n, "node-name"))) {
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
static json_t *backing_node(Graph *g, json_t *n)
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
static json_t *skip_filter(Graph *g, json_t *n)
{
    if (n && is_filter_driver(jstr(n, "drv"))) {
        json_t *below = node_by_file(g, jstr(n, "file"), node_depth(n), n);
        if (below) {
            return below;
        }
    }
    return n;
}

static json_t *resolve_disk(Graph *g, const char *disk, VdError **errp)
{
    size_t i;
    json_t *e;
    json_array_foreach(g->exports, i, e) {
        const char *id = jstr(e, "id");
        if (id && !strcmp(id, disk)) {
            const char *en = jstr(e, "node-name") ? jstr(e, "node-name") : "";
            json_t *n = node_by_name(g, en);
            if (n) {
                return skip_filter(g, n);
            }
            /*
             * vdiskd does not list the filter it puts on top of a disk during a job
             * ("#mirror-top-disk0"): take the listed node whose name ends the export's.
             */
            size_t k;
            json_t *cand;
            json_array_foreach(g->nodes, k, cand) {
                const char *cn = jstr(cand, "node-name");
                size_t cl = cn ? strlen(cn) : 0, el = strlen(en);
                if (cl && el > cl + 1 && en[el - cl - 1] == '-' && !strcmp(en + el - cl, cn)) {
                    return cand;
                }
            }
        }
    }
    json_t *n = node_by_name(g, disk);
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
            n = resolve_disk(g, base, errp);
            free(base);
            for (long k = 0; n && k < idx; k++) {
                n = backing_node(g, n);
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
static int set_chain_arg(Graph *g, json_t *args, const char *key, const char *value)
{
    VdError *err = NULL;
    json_t *n = resolve_disk(g, value, &err);
    char k[32];
    if (n) {
        snprintf(k, sizeof(k), "%s-node", key);
        return json_object_set_new(args, k, json_string(jstr(n, "node-name")));
    }
    vd_error_free(err);
    char *abs = absolute_path(value);
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
static int set_absolute_backing(Graph *g, json_t *args, json_t *top)
{
    const char *bn = jstr(args, "base-node");
    json_t *b = bn ? node_by_name(g, bn) : NULL;
    const char *file = b ? jstr(b, "file") : jstr(args, "base");
    if (!file && !bn) {
        json_t *n = top;
        for (int i = 0; n && backing_node(g, n) && i < 1000; i++) {
            n = backing_node(g, n);
        }
        file = n && n != top ? jstr(n, "file") : NULL;
    }
    if (!file) {
        return 0; /* no base: nothing is recorded */
    }
    char *abs = absolute_path(file);
    int r = abs ? json_object_set_new(args, "backing-file", json_string(abs)) : -1;
    free(abs);
    return r;
}

/* --------------------------------------------------------- job waiting */

static void print_progress(const char *label, uint64_t remaining, uint64_t total)
{
    double progress = 100.00;
    if (remaining != 0) {
        progress = 100.00 - (double)remaining * 100.00 / (double)total;
        if (progress >= 100.00) {
            progress = 99.99; /* not done: never show [100.00 %] early */
        }
    }
    fflush(stdout);
    fprintf(stderr, "\r%s: [%5.2f %%]", label, (int)(progress * 100) / 100.0);
    fflush(stderr);
}

/* query-block-jobs entry for job (new reference), NULL if absent; -1 in *rc on QMP failure. */
static json_t *query_job(QmpConn *c, const char *job, int *rc, VdError **errp)
{
    *rc = 0;
    json_t *jobs = qmpc_execute(c, "query-block-jobs", NULL, errp);
    if (!jobs) {
        *rc = -1;
        return NULL;
    }
    size_t i;
    json_t *j;
    json_t *found = NULL;
    json_array_foreach(jobs, i, j) {
        const char *dev = jstr(j, "device");
        if (dev && !strcmp(dev, job)) {
            found = json_incref(j);
            break;
        }
    }
    json_decref(jobs);
    return found;
}

/* Pop a terminal/ready event for job: sets *res and returns true if one was queued. */
static bool take_job_event(QmpConn *c, const char *job, bool want_ready, WaitResult *res,
                           char **fail_msg)
{
    static const char *const names[] = { "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                                         "BLOCK_JOB_READY", NULL };
    json_t *ev;
    while ((ev = qmpc_take_event(c, names, job))) {
        const char *name = jstr(ev, "event");
        json_t *data = json_object_get(ev, "data");
        bool done = true;
        if (!strcmp(name, "BLOCK_JOB_READY")) {
            done = want_ready;
            *res = WAIT_READY;
        } else if (!strcmp(name, "BLOCK_JOB_CANCELLED")) {
            *res = WAIT_CANCELLED;
        } else {
            const char *e = jstr(data, "error");
            *res = e ? WAIT_FAILED : WAIT_COMPLETED;
            if (e && fail_msg && !*fail_msg) {
                *fail_msg = strdup(e);
            }
        }
        json_decref(ev);
        if (done) {
            return true;
        }
    }
    return false;
}

/*
 * Wait until the job is ready (want_ready), or ends. verbose prints progress under label.
 * timeout_ms > 0 and Ctrl-C cancel the job (force) and report WAIT_CANCELLED, as virsh does.
 * On WAIT_FAILED *fail_msg (malloc'd) holds the job's error when the server gave one.
 */
static WaitResult wait_job(QmpConn *c, const char *job, const char *label, bool verbose,
                           bool want_ready, int64_t timeout_ms, bool async_abort, char **fail_msg)
{
    WaitResult res = WAIT_ERROR;
    int64_t start = now_ms();
    int64_t last_cur = -1, last_end = -1;
    bool aborting = false;
    int64_t abort_deadline = 0;
    VdError *err = NULL;

    for (;;) {
        if (take_job_event(c, job, want_ready, &res, fail_msg)) {
            break;
        }
        if (aborting) {
            if (now_ms() > abort_deadline) {
                tool_error("error: timed out waiting for job '%s' to end", job);
                return WAIT_ERROR;
            }
        } else {
            int rc;
            json_t *info = query_job(c, job, &rc, &err);
            if (rc < 0) {
                report(err, "failed to query job");
                return WAIT_ERROR;
            }
            /* Events precede the reply that follows them: check them before trusting info. */
            if (take_job_event(c, job, want_ready, &res, fail_msg)) {
                json_decref(info);
                break;
            }
            if (!info) {
                /* The job vanished without an event we saw: call it completed (virsh's rule). */
                res = WAIT_COMPLETED;
                break;
            }
            const char *status = jstr(info, "status");
            if (status && !strcmp(status, "concluded")) {
                const char *e = jstr(info, "error");
                res = e ? WAIT_FAILED : WAIT_COMPLETED;
                if (e && fail_msg && !*fail_msg) {
                    *fail_msg = strdup(e);
                }
                json_decref(info);
                break;
            }
            if (want_ready && json_is_true(json_object_get(info, "ready"))) {
                res = WAIT_READY;
                json_decref(info);
                break;
            }
            int64_t cur = json_integer_value(json_object_get(info, "offset"));
            int64_t end = json_integer_value(json_object_get(info, "len"));
            json_decref(info);
            /* A job that has not sized its work yet (len 0) has no progress to show (virsh). */
            if (verbose && (cur || end) && (cur != last_cur || end != last_end)) {
                print_progress(label, (uint64_t)(end - cur), (uint64_t)end);
            }
            last_cur = cur;
            last_end = end;

            if (int_caught || (timeout_ms > 0 && now_ms() - start > timeout_ms)) {
                json_t *a = json_pack("{s:s,s:b}", "device", job, "force", 1);
                json_t *r = qmpc_execute(c, "block-job-cancel", a, &err);
                if (!r) {
                    report(err, "failed to abort job");
                    return WAIT_ERROR;
                }
                json_decref(r);
                if (async_abort) {
                    res = WAIT_CANCELLED;
                    break;
                }
                aborting = true;
                want_ready = false;
                abort_deadline = now_ms() + END_TIMEOUT_MS;
            }
        }
        int w = qmpc_wait(c, POLL_MS, &err);
        if (w < 0 && w != -EINTR) {
            report(err, NULL);
            return WAIT_ERROR;
        }
    }
    if (verbose && (res == WAIT_COMPLETED || res == WAIT_READY)) {
        print_progress(label, 0, 1);
    }
    return res;
}

/* After block-job-complete / -cancel: wait for the job's end event, quietly. */
static WaitResult wait_end(QmpConn *c, const char *job, char **fail_msg)
{
    return wait_job(c, job, NULL, false, false, 0, false, fail_msg);
}

static void install_sigint(struct sigaction *old)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = catch_int;
    sigemptyset(&sa.sa_mask);
    int_caught = 0;
    sigaction(SIGINT, &sa, old);
}

/* Run a job verb and report "failed to <what> job for disk D: desc". */
static int job_verb(QmpConn *c, const char *cmd, const char *job, const char *disk,
                    const char *what)
{
    VdError *err = NULL;
    json_t *r = qmpc_execute(c, cmd, json_pack("{s:s}", "device", job), &err);
    if (!r) {
        char msg[512];
        snprintf(msg, sizeof(msg), "failed to %s job for disk %s", what, disk);
        report(err, msg);
        return -1;
    }
    json_decref(r);
    return 0;
}

/* Print virsh's "\n<msg>" plus the blank line virsh ends every command with. */
static void say_done(const char *msg)
{
    printf("\n%s\n", msg);
    fflush(stdout);
}

static void say(const char *msg)
{
    printf("%s\n", msg);
    fflush(stdout);
}

static void fail_report(const char *what, char *fail_msg)
{
    if (fail_msg) {
        tool_error("error: %s: %s", what, fail_msg);
    }
    free(fail_msg);
}

/* Common prologue: connect, load the graph, resolve DISK. Returns the node entry (borrowed). */
static json_t *setup(const char *sock, const char *disk, QmpConn **cp, Graph *g)
{
    *cp = open_conn(sock);
    if (!*cp) {
        return NULL;
    }
    VdError *err = NULL;
    if (graph_load(*cp, g, &err) < 0) {
        report(err, NULL);
        return NULL;
    }
    json_t *n = resolve_disk(g, disk, &err);
    if (!n) {
        report(err, NULL);
    }
    return n;
}

static bool bad_usage(const char *cmd, int c, char **argv)
{
    if (c == ':') {
        tool_error("error: option '%s' requires an argument (try '" TOOL_NAME " %s --help')",
                   argv[optind - 1], cmd);
    } else {
        tool_error("error: unrecognized option '%s' (try '" TOOL_NAME " %s --help')",
                   argv[optind - 1], cmd);
    }
    return true;
}

static int need_args(const char *cmd, int have, int want, const char *const *names)
{
    if (have < want) {
        tool_error("error: command '%s' requires <%s> option", cmd, names[have]);
        return -1;
    }
    if (have > want) {
        tool_error("error: unexpected data for command '%s' (try '" TOOL_NAME " %s --help')", cmd,
                   cmd);
        return -1;
    }
    return 0;
}

/*
 * Parse the options of command argv[0] by OPTS plus --help (which prints "usage: vdisk CMD
 * USAGE_ARGS"), then check that NPOS operands named POS_NAMES follow (NPOS < 0: the caller checks).
 * Returns 1 to go on, 0 after --help, -1 on bad usage (reported).
 */
static int parse_opts(int argc, char **argv, const VOpt *opts, const char *usage_args, int npos,
                      const char *const *pos_names)
{
    struct option longopts[VOPT_MAX + 2];
    int n = 0;
    for (; opts[n].name; n++) {
        assert(n < VOPT_MAX);
        bool takes_arg = opts[n].value && !opts[n].fixed;
        longopts[n] = (struct option){ opts[n].name, takes_arg ? required_argument : no_argument,
                                       NULL, n + 1 };
    }
    longopts[n] = (struct option){ "help", no_argument, NULL, VOPT_HELP };
    longopts[n + 1] = (struct option){ NULL, 0, NULL, 0 };
    int c;
    while ((c = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        if (c == VOPT_HELP) {
            printf("usage: " TOOL_NAME " %s %s\n", argv[0], usage_args);
            return 0;
        }
        if (c < 1 || c > n) { /* '?' or ':' (option values are 1..n, far below both) */
            bad_usage(argv[0], c, argv);
            return -1;
        }
        const VOpt *o = &opts[c - 1];
        if (o->value) {
            *o->value = o->fixed ? o->fixed : optarg;
        } else {
            *o->flag = true;
        }
    }
    if (npos >= 0 && need_args(argv[0], argc - optind, npos, pos_names) < 0) {
        return -1;
    }
    return 1;
}

/* The options every job-starting command (blockcopy, blockpull, blockcommit) takes. */
typedef struct {
    const char *sock, *bw, *timeout_s;
    bool wait, verbose, bytes, async;
    bool absolute; /* --absolute-backing: record backing names by absolute paths */
} JobOpts;

/* parse_opts() with the JobOpts options added after the command's own EXTRA ones. */
static int parse_job_opts(int argc, char **argv, JobOpts *j, const VOpt *extra,
                          const char *usage_args, int npos, const char *const *pos_names)
{
    const VOpt common[] = {
        { "socket", NULL, &j->sock, NULL },
        { "wait", &j->wait, NULL, NULL },
        { "verbose", &j->verbose, NULL, NULL },
        { "bandwidth", NULL, &j->bw, NULL },
        { "bytes", &j->bytes, NULL, NULL },
        { "timeout", NULL, &j->timeout_s, NULL },
        { "async", &j->async, NULL, NULL },
        { "absolute-backing", &j->absolute, NULL, NULL },
    };
    const size_t ncommon = sizeof(common) / sizeof(common[0]);
    VOpt all[VOPT_MAX + 1];
    size_t n = 0;
    for (; extra[n].name; n++) {
        assert(n + ncommon < VOPT_MAX);
        all[n] = extra[n];
    }
    memcpy(&all[n], common, sizeof(common));
    all[n + ncommon] = (VOpt){ NULL, NULL, NULL, NULL };
    return parse_opts(argc, argv, all, usage_args, npos, pos_names);
}

static int64_t timeout_ms_of(const char *arg, int *ok)
{
    uint64_t v;
    *ok = 1;
    if (!arg) {
        return 0;
    }
    if (parse_num("timeout", arg, &v) < 0 || v == 0 || v > INT_MAX / 1000) {
        if (v == 0 || v > INT_MAX / 1000) {
            tool_error("error: invalid timeout");
        }
        *ok = 0;
        return 0;
    }
    return (int64_t)v * 1000;
}

/* --timeout in ms (0: none) and --bandwidth [--bytes] as a QMP speed (0: unlimited). */
static int job_opts_numbers(const JobOpts *jo, int64_t *timeout_ms, int64_t *speed)
{
    int ok;
    *timeout_ms = timeout_ms_of(jo->timeout_s, &ok);
    *speed = 0;
    if (!ok || (jo->bw && bandwidth_to_speed(jo->bw, jo->bytes, speed) < 0)) {
        return -1;
    }
    return 0;
}

/* ------------------------------------------------- shared job command flow */

/* What blockcopy, blockpull and blockcommit share: the connection, the graph, the job id and the
 * SIGINT handler installed while waiting. job_run_end() releases whatever was set up. */
typedef struct {
    QmpConn *conn;
    Graph g;
    char *job;
    char *fail_msg;
    struct sigaction old_int;
    bool sig_installed;
} JobRun;

/* How one job command names itself in what it prints. */
typedef struct {
    const char *qmp_cmd;    /* "drive-mirror" */
    const char *label;      /* progress label, "Block Copy" */
    const char *aborted;    /* "Copy aborted" */
    const char *failed;     /* "Copy failed" */
    const char *fail_what;  /* "block copy failed" */
} JobKind;

/* libvirt's rule: --verbose and --async only make sense when the command waits. */
static int check_blocking(bool blocking, bool verbose, bool async, const char *finish_opt)
{
    const char *opt = !blocking && verbose ? "--verbose" : !blocking && async ? "--async" : NULL;
    if (opt) {
        tool_error("error: %s requires at least one of --timeout, --wait, --pivot, or %s", opt,
                   finish_opt);
        return -1;
    }
    return 0;
}

/* Name the job for NODE and build its {"job-id", "device"} arguments. Returns the new object,
 * or NULL (reported). */
static json_t *job_run_args(JobRun *r, json_t *node)
{
    const char *nodename = jstr(node, "node-name");
    r->job = job_id_for(nodename);
    json_t *args = json_pack("{s:s,s:s}", "job-id", r->job ? r->job : "", "device", nodename);
    if (!r->job || !args) {
        tool_error("error: out of memory");
        json_decref(args);
        return NULL;
    }
    return args;
}

/* Start the job with ARGS (consumed). Without BLOCKING print STARTED and return 0; otherwise wait
 * until it is ready (WANT_READY) or completed and return 1. Returns -1 when it could not start,
 * was aborted or failed (all reported). */
static int job_run_start(JobRun *r, const JobKind *k, json_t *args, bool blocking,
                         const char *started, bool verbose, bool want_ready, int64_t timeout_ms,
                         bool async)
{
    if (blocking) {
        install_sigint(&r->old_int);
        r->sig_installed = true;
    }
    VdError *err = NULL;
    json_t *res = qmpc_execute(r->conn, k->qmp_cmd, args, &err);
    if (!res) {
        report(err, NULL);
        return -1;
    }
    json_decref(res);
    if (!blocking) {
        say(started);
        return 0;
    }
    switch (wait_job(r->conn, r->job, k->label, verbose, want_ready, timeout_ms, async,
                     &r->fail_msg)) {
    case WAIT_ERROR:
        return -1;
    case WAIT_CANCELLED:
        say_done(k->aborted);
        return -1;
    case WAIT_FAILED:
        say_done(k->failed);
        fail_report(k->fail_what, r->fail_msg);
        r->fail_msg = NULL;
        return -1;
    case WAIT_READY:
    case WAIT_COMPLETED:
        break;
    }
    return 1;
}

/* Pivot (block-job-complete) or finish (block-job-cancel) a ready job, wait for its end and say
 * DONE_MSG. Returns 0, or -1 (reported). */
static int job_run_finish(JobRun *r, const char *disk, bool pivot, const char *done_msg)
{
    if (job_verb(r->conn, pivot ? "block-job-complete" : "block-job-cancel", r->job, disk,
                 pivot ? "pivot" : "finish") < 0) {
        return -1;
    }
    WaitResult w = wait_end(r->conn, r->job, &r->fail_msg);
    /* A soft cancel of a ready mirror ends it as COMPLETED (QEMU >= 6.2) or CANCELLED. */
    if (w == WAIT_ERROR || w == WAIT_FAILED || (pivot && w == WAIT_CANCELLED)) {
        if (w == WAIT_CANCELLED) {
            tool_error("error: failed to pivot job for disk %s: job was cancelled", disk);
        } else if (w == WAIT_FAILED) {
            fail_report(pivot ? "failed to pivot job" : "failed to finish job", r->fail_msg);
            r->fail_msg = NULL;
        }
        return -1;
    }
    say_done(done_msg);
    return 0;
}

static void job_run_end(JobRun *r)
{
    if (r->sig_installed) {
        sigaction(SIGINT, &r->old_int, NULL);
    }
    free(r->fail_msg);
    free(r->job);
    graph_free(&r->g);
    qmpc_close(r->conn);
}

/* ------------------------------------------------------------ blockcopy */

int virsh_blockcopy(int argc, char **argv)
{
    JobOpts jo = { 0 };
    const char *format = NULL, *gran = NULL, *bufsz = NULL, *base_node = NULL, *node_name = NULL;
    bool shallow = false, reuse = false, pivot = false, finish = false, sync_writes = false;
    bool backing_matches = false, verify = false;
    const VOpt opts[] = {
        { "verify", &verify, NULL, NULL },
        { "shallow", &shallow, NULL, NULL },
        { "reuse-external", &reuse, NULL, NULL },
        { "backing-matches", &backing_matches, NULL, NULL },
        { "format", NULL, &format, NULL },
        { "raw", NULL, &format, "raw" },
        { "pivot", &pivot, NULL, NULL },
        { "finish", &finish, NULL, NULL },
        { "granularity", NULL, &gran, NULL },
        { "buf-size", NULL, &bufsz, NULL },
        { "synchronous-writes", &sync_writes, NULL, NULL },
        { "base-node", NULL, &base_node, NULL },
        { "node-name", NULL, &node_name, NULL },
        { NULL, NULL, NULL, NULL }
    };
    static const char *const names[] = { "disk", "dest" };
    int p = parse_job_opts(argc, argv, &jo, opts,
                           "DISK DEST [--shallow] [--reuse-external [--backing-matches]] [--verify] "
                           "[--format F|--raw] [--wait] "
                           "[--verbose] [--pivot|--finish] [--timeout S] [--async] [--bandwidth N "
                           "[--bytes]] [--granularity N] [--buf-size N] [--synchronous-writes] "
                           "[--node-name N] [--base-node B] [--socket PATH]",
                           2, names);
    if (p <= 0) {
        return p < 0;
    }
    const char *disk = argv[optind], *dest = argv[optind + 1];
    if (pivot && finish) {
        tool_error("error: Options --pivot and --finish are mutually exclusive");
        return 1;
    }
    if (backing_matches && !reuse) {
        tool_error("error: Option --reuse-external is required by option --backing-matches");
        return 1;
    }
    /* libvirt's rule: without --reuse-external the copy creates DEST, so an existing file (not a
     * block device) is refused rather than overwritten. */
    struct stat dst;
    if (!reuse && stat(dest, &dst) == 0 && !S_ISBLK(dst.st_mode)) {
        tool_error("error: external destination file for disk %s already exists and is not a "
                   "block device: %s (use --reuse-external to copy onto it)", disk, dest);
        return 1;
    }
    int ok;
    int64_t timeout_ms = timeout_ms_of(jo.timeout_s, &ok);
    if (!ok) {
        return 1;
    }
    bool blocking = jo.wait || pivot || finish || timeout_ms > 0;
    if (check_blocking(blocking, jo.verbose, jo.async, "--finish") < 0) {
        return 1;
    }
    int64_t speed = 0;
    uint64_t granularity = 0, buf_size = 0;
    if ((jo.bw && bandwidth_to_speed(jo.bw, jo.bytes, &speed) < 0) ||
        (gran && parse_num("granularity", gran, &granularity) < 0) ||
        (bufsz && parse_num("buf-size", bufsz, &buf_size) < 0)) {
        return 1;
    }
    if (granularity > UINT32_MAX || buf_size > INT64_MAX) {
        tool_error("error: Numeric value '%s' for <%s> option is malformed or out of range",
                   granularity > UINT32_MAX ? gran : bufsz,
                   granularity > UINT32_MAX ? "granularity" : "buf-size");
        return 1;
    }

    static const JobKind kind = { "drive-mirror", "Block Copy", "Copy aborted", "Copy failed",
                                  "block copy failed" };
    int ret = 1;
    JobRun run = { 0 };
    char *target = NULL;
    json_t *node = setup(jo.sock, disk, &run.conn, &run.g);
    json_t *args = node ? job_run_args(&run, node) : NULL;
    if (!args) {
        goto out;
    }
    target = absolute_path(dest);
    if (!target) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    json_object_set_new(args, "target", json_string(target));
    json_object_set_new(args, "sync", json_string(shallow ? "top" : "full"));
    /* Without a mode vdiskd records the backing name relative to DEST (QEMU: absolute). */
    if (reuse || jo.absolute) {
        json_object_set_new(args, "mode", json_string(reuse ? "existing" : "absolute-paths"));
    }
    if (format) {
        json_object_set_new(args, "format", json_string(format));
    }
    if (speed) {
        json_object_set_new(args, "speed", json_integer(speed));
    }
    if (granularity) {
        json_object_set_new(args, "granularity", json_integer((json_int_t)granularity));
    }
    if (buf_size) {
        json_object_set_new(args, "buf-size", json_integer((json_int_t)buf_size));
    }
    if (sync_writes) {
        json_object_set_new(args, "copy-mode", json_string("write-blocking"));
    }
    if (node_name) {
        json_object_set_new(args, "node-name", json_string(node_name));
    }
    if (base_node) {
        /* Not a QEMU 7.2 drive-mirror argument: passed through for daemons that have it. */
        json_object_set_new(args, "base-node", json_string(base_node));
    }
    if (backing_matches) {
        /* vdiskd's extension (existing target whose backing is outside the source's chain). */
        json_object_set_new(args, "x-backing-matches", json_true());
    }
    if (verify) {
        /* vdiskd's extension: compare source and target before the pivot / finish. */
        json_object_set_new(args, "x-verify", json_true());
    }
    int st = job_run_start(&run, &kind, args, blocking, "Block Copy started", jo.verbose, true,
                           timeout_ms, jo.async);
    if (st <= 0) {
        ret = st < 0;
        goto out;
    }
    if (pivot || finish) {
        if (job_run_finish(&run, disk, pivot,
                           pivot ? "Successfully pivoted" : "Successfully copied") < 0) {
            goto out;
        }
    } else {
        say_done("Now in mirroring phase");
    }
    ret = 0;
out:
    free(target);
    job_run_end(&run);
    return ret;
}

/* ------------------------------------------------------------ blockpull */

int virsh_blockpull(int argc, char **argv)
{
    JobOpts jo = { 0 };
    const char *base = NULL;
    bool keep_relative = false; /* libvirt's flag: relative names are vdiskd's default */
    const VOpt opts[] = {
        { "base", NULL, &base, NULL },
        { "keep-relative", &keep_relative, NULL, NULL },
        { NULL, NULL, NULL, NULL }
    };
    static const char *const names[] = { "disk" };
    int p = parse_job_opts(argc, argv, &jo, opts,
                           "DISK [--base B] [--keep-relative|--absolute-backing] [--wait "
                           "[--verbose] [--timeout S] [--async]] [--bandwidth N [--bytes]] "
                           "[--socket PATH]",
                           1, names);
    if (p <= 0) {
        return p < 0;
    }
    const char *disk = argv[optind];
    if (jo.verbose && !jo.wait) {
        tool_error("error: Option --wait is required by option --verbose");
        return 1;
    }
    if (jo.async && !jo.wait) {
        tool_error("error: Option --wait is required by option --async");
        return 1;
    }
    int64_t timeout_ms, speed;
    if (job_opts_numbers(&jo, &timeout_ms, &speed) < 0) {
        return 1;
    }

    static const JobKind kind = { "block-stream", "Block Pull", "Pull aborted", "Pull failed",
                                  "block pull failed" };
    int ret = 1;
    JobRun run = { 0 };
    json_t *node = setup(jo.sock, disk, &run.conn, &run.g);
    json_t *args = node ? job_run_args(&run, node) : NULL;
    if (!args) {
        goto out;
    }
    if (base && (set_chain_arg(&run.g, args, "base", base) < 0 ||
                 (jo.absolute && set_absolute_backing(&run.g, args, node) < 0))) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    if (speed) {
        json_object_set_new(args, "speed", json_integer(speed));
    }
    int st = job_run_start(&run, &kind, args, jo.wait, "Block Pull started", jo.verbose, false,
                           timeout_ms, jo.async);
    if (st <= 0) {
        ret = st < 0;
        goto out;
    }
    say_done("Pull complete");
    ret = 0;
out:
    job_run_end(&run);
    return ret;
}

/* ---------------------------------------------------------- blockcommit */

int virsh_blockcommit(int argc, char **argv)
{
    JobOpts jo = { 0 };
    const char *base = NULL, *top = NULL;
    bool shallow = false, active = false, pivot = false, keep = false, keep_relative = false;
    const VOpt opts[] = {
        { "keep-relative", &keep_relative, NULL, NULL },
        { "base", NULL, &base, NULL },
        { "top", NULL, &top, NULL },
        { "shallow", &shallow, NULL, NULL },
        { "active", &active, NULL, NULL },
        { "pivot", &pivot, NULL, NULL },
        { "keep-overlay", &keep, NULL, NULL },
        { NULL, NULL, NULL, NULL }
    };
    static const char *const names[] = { "disk" };
    int p = parse_job_opts(argc, argv, &jo, opts,
                           "DISK [--base B | --shallow] [--top T] [--active] "
                           "[--keep-relative|--absolute-backing] "
                           "[--pivot|--keep-overlay] [--wait [--verbose] [--timeout S] [--async]] "
                           "[--bandwidth N [--bytes]] [--socket PATH]",
                           1, names);
    if (p <= 0) {
        return p < 0;
    }
    const char *disk = argv[optind];
    if (pivot && keep) {
        tool_error("error: Options --pivot and --keep-overlay are mutually exclusive");
        return 1;
    }
    if (base && shallow) {
        tool_error("error: Options --base and --shallow are mutually exclusive");
        return 1;
    }
    if (keep_relative && jo.absolute) {
        tool_error("error: Options --keep-relative and --absolute-backing are mutually exclusive");
        return 1;
    }
    int64_t timeout_ms, speed;
    if (job_opts_numbers(&jo, &timeout_ms, &speed) < 0) {
        return 1;
    }
    active = active || pivot || keep;
    bool blocking = jo.wait || pivot || keep || timeout_ms > 0;
    if (check_blocking(blocking, jo.verbose, jo.async, "--keep-overlay") < 0) {
        return 1;
    }

    static const JobKind kind = { "block-commit", "Block commit", "Commit aborted",
                                  "Commit failed", "block commit failed" };
    int ret = 1;
    JobRun run = { 0 };
    json_t *node = setup(jo.sock, disk, &run.conn, &run.g);
    if (!node) {
        goto out;
    }
    /* Which layer is the top? (libvirt's checks: active commit iff top is the active layer) */
    json_t *top_node = node;
    if (top) {
        VdError *terr = NULL;
        top_node = resolve_disk(&run.g, top, &terr);
        vd_error_free(terr);
    }
    bool top_is_active = top_node == node;
    if (active && !top_is_active) {
        tool_error("error: active commit requested but '%s' is not active", top);
        goto out;
    }
    if (!active && top_is_active) {
        tool_error("error: commit of '%s' active layer requires active flag", top ? top : disk);
        goto out;
    }
    json_t *args = job_run_args(&run, node);
    if (!args) {
        goto out;
    }
    if (!active && set_chain_arg(&run.g, args, "top", top) < 0) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    if (shallow) {
        json_t *b = top_node ? backing_node(&run.g, top_node) : NULL;
        if (!b) {
            tool_error("error: could not find the backing image of '%s'", top ? top : disk);
            json_decref(args);
            goto out;
        }
        json_object_set_new(args, "base-node", json_string(jstr(b, "node-name")));
    } else if (base && set_chain_arg(&run.g, args, "base", base) < 0) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    /* An active commit rewrites no header (QEMU refuses backing-file for it). */
    if (jo.absolute && !active && set_absolute_backing(&run.g, args, top_node) < 0) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    if (speed) {
        json_object_set_new(args, "speed", json_integer(speed));
    }
    int st = job_run_start(&run, &kind, args, blocking,
                           active ? "Active Block Commit started" : "Block Commit started",
                           jo.verbose, active, timeout_ms, jo.async);
    if (st <= 0) {
        ret = st < 0;
        goto out;
    }
    if (active && (pivot || keep)) {
        if (job_run_finish(&run, disk, pivot,
                           pivot ? "Successfully pivoted" : "Commit complete, overlay image kept")
            < 0) {
            goto out;
        }
    } else if (active) {
        say_done("Now in synchronized phase");
    } else {
        say_done("Commit complete");
    }
    ret = 0;
out:
    job_run_end(&run);
    return ret;
}

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
    const char *phase = jstr(job, "vdisk-phase");
    printf("    Phase: %s", phase ? phase : jstr(job, "status") ? jstr(job, "status") : "unknown");
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

/* The job running on this disk: our id for its node, the node name itself, or DISK verbatim. */
static json_t *find_disk_job(QmpConn *c, const char *disk, json_t *node, VdError **errp)
{
    json_t *jobs = qmpc_execute(c, "query-block-jobs", NULL, errp);
    if (!jobs) {
        return NULL;
    }
    const char *nodename = node ? jstr(node, "node-name") : NULL;
    char *ours = nodename ? job_id_for(nodename) : NULL;
    const char *cands[] = { ours, nodename, disk };
    json_t *found = NULL;
    for (int k = 0; k < 3 && !found; k++) {
        size_t i;
        json_t *j;
        if (!cands[k]) {
            continue;
        }
        json_array_foreach(jobs, i, j) {
            const char *dev = jstr(j, "device");
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
    bool verbose = false;
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
        { NULL, NULL, NULL, NULL }
    };
    static const char *const names[] = { "disk" };
    int p = parse_opts(argc, argv, opts,
                       "DISK [--info [--raw|--verbose]|--abort [--async]|--pivot|--bandwidth N "
                       "[--bytes]] "
                       "[--socket PATH]",
                       1, names);
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
    };
    bool set[] = { raw, info, bytes, abort_, pivot, async, bw != NULL, verbose };
    const char *setnames[] = { "raw", "info", "bytes", "abort", "pivot", "async", "bandwidth",
                               "verbose" };
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
    if (bw && bandwidth_to_speed(bw, bytes, &speed) < 0) {
        return 1;
    }

    int ret = 1;
    QmpConn *conn = open_conn(sock);
    Graph g = { 0 };
    char *fail_msg = NULL;
    json_t *job = NULL;
    VdError *err = NULL;
    if (!conn) {
        goto out;
    }
    json_t *node = NULL;
    if (graph_load(conn, &g, &err) < 0) {
        report(err, NULL);
        goto out;
    }
    node = resolve_disk(&g, disk, &err);
    vd_error_free(err); /* a job id that is no disk is still worth looking up */
    err = NULL;
    job = find_disk_job(conn, disk, node, &err);
    bool querying = !(bw || abort_ || pivot || async);
    if (!job) {
        if (querying && vd_error_code(err) == ENOENT) {
            /* virsh: not an error for --info */
            printf("%s\n", vd_error_msg(err));
            vd_error_free(err);
            ret = 0;
        } else {
            report(err, NULL);
        }
        goto out;
    }
    const char *id = jstr(job, "device");
    if (bw) {
        json_t *r = qmpc_execute(conn, "block-job-set-speed",
                                 json_pack("{s:s,s:I}", "device", id, "speed", (json_int_t)speed),
                                 &err);
        if (!r) {
            report(err, NULL);
            goto out;
        }
        json_decref(r);
        printf("\n");
        ret = 0;
        goto out;
    }
    if (abort_ || pivot || async) {
        if (job_verb(conn, pivot ? "block-job-complete" : "block-job-cancel", id, disk,
                     pivot ? "pivot" : "abort") < 0) {
            goto out;
        }
        if (!async) {
            WaitResult w = wait_end(conn, id, &fail_msg);
            if (w == WAIT_ERROR) {
                goto out;
            }
            if (w == WAIT_FAILED) {
                fail_report(pivot ? "failed to pivot job" : "failed to abort job", fail_msg);
                fail_msg = NULL;
                goto out;
            }
        }
        printf("\n");
        ret = 0;
        goto out;
    }
    const char *type = jstr(job, "type");
    uint64_t cur = (uint64_t)json_integer_value(json_object_get(job, "offset"));
    uint64_t end = (uint64_t)json_integer_value(json_object_get(job, "len"));
    uint64_t spd = (uint64_t)json_integer_value(json_object_get(job, "speed"));
    if (raw) {
        printf(" type=%s\n bandwidth=%" PRIu64 "\n cur=%" PRIu64 "\n end=%" PRIu64 "\n",
               job_raw_type(type), spd >> 20, cur, end);
    } else {
        print_progress(job_label(type), end - cur, end);
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
    graph_free(&g);
    qmpc_close(conn);
    return ret;
}

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
    int p = parse_opts(argc, argv, opts,
                       "DISK OVERLAY [--format F] [--reuse-external] [--absolute-backing] "
                       "[--node-name N] "
                       "[--socket PATH]",
                       2, names);
    if (p <= 0) {
        return p < 0;
    }
    const char *disk = argv[optind], *overlay = argv[optind + 1];
    int ret = 1;
    QmpConn *conn = NULL;
    Graph g = { 0 };
    char *file = NULL;
    json_t *node = setup(sock, disk, &conn, &g);
    if (!node) {
        goto out;
    }
    file = absolute_path(overlay);
    json_t *args = json_pack("{s:s,s:s}", "node-name", jstr(node, "node-name"),
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
            if (!node_by_name(&g, auto_name)) {
                break;
            }
        }
        node_name = auto_name;
    }
    json_object_set_new(args, "snapshot-node-name", json_string(node_name));
    VdError *err = NULL;
    json_t *r = qmpc_execute(conn, "blockdev-snapshot-sync", args, &err);
    if (!r) {
        report(err, NULL);
        goto out;
    }
    json_decref(r);
    printf("Disk snapshot %s created\n", overlay);
    ret = 0;
out:
    fflush(stdout);
    free(file);
    graph_free(&g);
    qmpc_close(conn);
    return ret;
}

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
    int p = parse_opts(argc, argv, opts, "[--details] [--socket PATH]", -1, NULL);
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
    QmpConn *conn = open_conn(sock);
    if (!conn) {
        goto out;
    }
    if (graph_load(conn, &g, &err) < 0) {
        report(err, NULL);
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
        const char *id = jstr(e, "id");
        const char *nn = jstr(e, "node-name");
        json_t *n = nn ? skip_filter(&g, node_by_name(&g, nn)) : NULL;
        if (!details) {
            const char *row[] = { id, n ? jstr(n, "file") : NULL };
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
            const char *src = layer ? jstr(layer, "file") : (img ? jstr(img, "filename") : NULL);
            const char *fmt = layer ? jstr(layer, "drv") : (img ? jstr(img, "format") : NULL);
            const char *row[] = { target, layer ? jstr(layer, "node-name") : NULL, fmt, src };
            if (table_add(&t, row) < 0) {
                goto oom;
            }
            /* Follow the nested image info; match each layer to a named node when possible. */
            json_t *next_img = img ? json_object_get(img, "backing-image") : NULL;
            json_t *next_layer = layer ? backing_node(&g, layer) : NULL;
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
    graph_free(&g);
    qmpc_close(conn);
    return ret;
}
