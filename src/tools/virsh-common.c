/*
 * virsh-common.c - what every virsh-like command of `vdisk` shares: errors and numbers, option
 * parsing, waiting for a block job (events + polling, Ctrl-C and --timeout cancel it), and the
 * start/finish flow of the job-starting commands. Conventions: see virsh-int.h.
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

/* Poll query-block-jobs this often for progress (virsh: 500 ms; events wake us earlier). */
#define POLL_MS 250
/* How long to wait for a job to end after a cancel / complete we sent. */
#define END_TIMEOUT_MS 60000


static volatile sig_atomic_t int_caught;

static void catch_int(int sig)
{
    (void)sig;
    int_caught = 1;
}

/* ---------------------------------------------------------------- helpers */

void vs_report(VdError *err, const char *what)
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

QmpConn *vs_open_conn(const char *sock_opt)
{
    VdError *err = NULL;
    QmpConn *c = qmpc_connect(virsh_socket_path(sock_opt), &err);
    if (!c) {
        vs_report(err, NULL);
    }
    return c;
}

/* virsh's message for a bad number. */
int vs_parse_num(const char *opt, const char *arg, uint64_t *out)
{
    if (tool_parse_uint(arg, out) < 0) {
        tool_error("error: Numeric value '%s' for <%s> option is malformed or out of range", arg,
                   opt);
        return -1;
    }
    return 0;
}

/* --bandwidth (MiB/s unless bytes) -> bytes/s for QMP "speed" (an int64). */
int vs_bandwidth_to_speed(const char *arg, bool bytes, int64_t *speed)
{
    uint64_t v;
    if (vs_parse_num("bandwidth", arg, &v) < 0) {
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
char *vs_absolute_path(const char *p)
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
bool vs_same_file(const char *a, const char *b)
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
char *vs_job_id_for(const char *node)
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

/* --------------------------------------------------------- job waiting */

void vs_print_progress(const char *label, uint64_t remaining, uint64_t total)
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
        const char *dev = vs_jstr(j, "device");
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
        const char *name = vs_jstr(ev, "event");
        json_t *data = json_object_get(ev, "data");
        bool done = true;
        if (!strcmp(name, "BLOCK_JOB_READY")) {
            done = want_ready;
            *res = WAIT_READY;
        } else if (!strcmp(name, "BLOCK_JOB_CANCELLED")) {
            *res = WAIT_CANCELLED;
        } else {
            const char *e = vs_jstr(data, "error");
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
                vs_report(err, "failed to query job");
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
            const char *status = vs_jstr(info, "status");
            if (status && !strcmp(status, "concluded")) {
                const char *e = vs_jstr(info, "error");
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
                vs_print_progress(label, (uint64_t)(end - cur), (uint64_t)end);
            }
            last_cur = cur;
            last_end = end;

            if (int_caught || (timeout_ms > 0 && now_ms() - start > timeout_ms)) {
                json_t *a = json_pack("{s:s,s:b}", "device", job, "force", 1);
                json_t *r = qmpc_execute(c, "block-job-cancel", a, &err);
                if (!r) {
                    vs_report(err, "failed to abort job");
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
            vs_report(err, NULL);
            return WAIT_ERROR;
        }
    }
    if (verbose && (res == WAIT_COMPLETED || res == WAIT_READY)) {
        vs_print_progress(label, 0, 1);
    }
    return res;
}

/* After block-job-complete / -cancel: wait for the job's end event, quietly. */
WaitResult vs_wait_end(QmpConn *c, const char *job, char **fail_msg)
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
int vs_job_verb(QmpConn *c, const char *cmd, const char *job, const char *disk,
                const char *what)
{
    VdError *err = NULL;
    json_t *r = qmpc_execute(c, cmd, json_pack("{s:s}", "device", job), &err);
    if (!r) {
        char msg[512];
        snprintf(msg, sizeof(msg), "failed to %s job for disk %s", what, disk);
        vs_report(err, msg);
        return -1;
    }
    json_decref(r);
    return 0;
}

/* Print virsh's "\n<msg>" plus the blank line virsh ends every command with. */
void vs_say_done(const char *msg)
{
    printf("\n%s\n", msg);
    fflush(stdout);
}

static void say(const char *msg)
{
    printf("%s\n", msg);
    fflush(stdout);
}

void vs_fail_report(const char *what, char *fail_msg)
{
    if (fail_msg) {
        tool_error("error: %s: %s", what, fail_msg);
    }
    free(fail_msg);
}

/* Common prologue: connect, load the graph, resolve DISK. Returns the node entry (borrowed). */
json_t *vs_setup(const char *sock, const char *disk, QmpConn **cp, Graph *g)
{
    *cp = vs_open_conn(sock);
    if (!*cp) {
        return NULL;
    }
    VdError *err = NULL;
    if (vs_graph_load(*cp, g, &err) < 0) {
        vs_report(err, NULL);
        return NULL;
    }
    json_t *n = vs_resolve_disk(g, disk, &err);
    if (!n) {
        vs_report(err, NULL);
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
 * Parse the options of command argv[0] by OPTS plus --help (which prints the command's line of
 * `vdisk --help`), then check that NPOS operands named POS_NAMES follow (NPOS < 0: the caller checks).
 * Returns 1 to go on, 0 after --help, -1 on bad usage (reported).
 */
int vs_parse_opts(int argc, char **argv, const VOpt *opts, int npos, const char *const *pos_names)
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
            tool_print_usage(argv[0]);
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


/* vs_parse_opts() with the JobOpts options added after the command's own EXTRA ones. */
int vs_parse_job_opts(int argc, char **argv, JobOpts *j, const VOpt *extra, int npos,
                      const char *const *pos_names)
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
    return vs_parse_opts(argc, argv, all, npos, pos_names);
}

int64_t vs_timeout_ms_of(const char *arg, int *ok)
{
    uint64_t v;
    *ok = 1;
    if (!arg) {
        return 0;
    }
    if (vs_parse_num("timeout", arg, &v) < 0 || v == 0 || v > INT_MAX / 1000) {
        if (v == 0 || v > INT_MAX / 1000) {
            tool_error("error: invalid timeout");
        }
        *ok = 0;
        return 0;
    }
    return (int64_t)v * 1000;
}

/* --timeout in ms (0: none) and --bandwidth [--bytes] as a QMP speed (0: unlimited). */
int vs_job_opts_numbers(const JobOpts *jo, int64_t *timeout_ms, int64_t *speed)
{
    int ok;
    *timeout_ms = vs_timeout_ms_of(jo->timeout_s, &ok);
    *speed = 0;
    if (!ok || (jo->bw && vs_bandwidth_to_speed(jo->bw, jo->bytes, speed) < 0)) {
        return -1;
    }
    return 0;
}

/* ------------------------------------------------- shared job command flow */


/* libvirt's rule: --verbose and --async only make sense when the command waits. */
int vs_check_blocking(bool blocking, bool verbose, bool async, const char *finish_opt)
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
json_t *vs_job_run_args(JobRun *r, json_t *node)
{
    const char *nodename = vs_jstr(node, "node-name");
    r->job = vs_job_id_for(nodename);
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
int vs_job_run_start(JobRun *r, const JobKind *k, json_t *args, bool blocking,
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
        vs_report(err, NULL);
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
        vs_say_done(k->aborted);
        return -1;
    case WAIT_FAILED:
        vs_say_done(k->failed);
        vs_fail_report(k->fail_what, r->fail_msg);
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
int vs_job_run_finish(JobRun *r, const char *disk, bool pivot, const char *done_msg)
{
    if (vs_job_verb(r->conn, pivot ? "block-job-complete" : "block-job-cancel", r->job, disk,
                    pivot ? "pivot" : "finish") < 0) {
        return -1;
    }
    WaitResult w = vs_wait_end(r->conn, r->job, &r->fail_msg);
    /* A soft cancel of a ready mirror ends it as COMPLETED (QEMU >= 6.2) or CANCELLED. */
    if (w == WAIT_ERROR || w == WAIT_FAILED || (pivot && w == WAIT_CANCELLED)) {
        if (w == WAIT_CANCELLED) {
            tool_error("error: failed to pivot job for disk %s: job was cancelled", disk);
        } else if (w == WAIT_FAILED) {
            vs_fail_report(pivot ? "failed to pivot job" : "failed to finish job", r->fail_msg);
            r->fail_msg = NULL;
        }
        return -1;
    }
    vs_say_done(done_msg);
    return 0;
}

void vs_job_run_end(JobRun *r)
{
    if (r->sig_installed) {
        sigaction(SIGINT, &r->old_int, NULL);
    }
    free(r->fail_msg);
    free(r->job);
    vs_graph_free(&r->g);
    qmpc_close(r->conn);
}
