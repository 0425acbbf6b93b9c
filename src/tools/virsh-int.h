/*
 * virsh-int.h - what the virsh-like commands of `vdisk` share (internal to src/tools): option
 * parsing, the disk/graph lookups over query-named-block-nodes, waiting for a job, and the flow
 * common to the job-starting commands. One file per command family uses it: virsh-copy.c
 * (blockcopy, blockpull, blockcommit), virsh-blockjob.c, virsh-snapshot.c, virsh-domblklist.c.
 */
#ifndef VDISK_TOOLS_VIRSH_INT_H
#define VDISK_TOOLS_VIRSH_INT_H

#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

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

typedef struct Graph {
    json_t *exports; /* query-block-exports */
    json_t *nodes;   /* query-named-block-nodes */
} Graph;

/* The options every job-starting command (blockcopy, blockpull, blockcommit) takes. */
typedef struct {
    const char *sock, *bw, *timeout_s;
    bool wait, verbose, bytes, async;
    bool absolute; /* --absolute-backing: record backing names by absolute paths */
} JobOpts;

/* What blockcopy, blockpull and blockcommit share: the connection, the graph, the job id and the
 * SIGINT handler installed while waiting. vs_job_run_end() releases whatever was set up. */
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

/* ---- virsh-common.c: helpers, options, job waiting, the job-command flow ---- */
void vs_report(VdError *err, const char *what);
QmpConn *vs_open_conn(const char *sock_opt);
int vs_parse_num(const char *opt, const char *arg, uint64_t *out);
int vs_bandwidth_to_speed(const char *arg, bool bytes, int64_t *speed);
char *vs_absolute_path(const char *p);
bool vs_same_file(const char *a, const char *b);
char *vs_job_id_for(const char *node);
void vs_print_progress(const char *label, uint64_t remaining, uint64_t total);
WaitResult vs_wait_end(QmpConn *c, const char *job, char **fail_msg);
int vs_job_verb(QmpConn *c, const char *cmd, const char *job, const char *disk,
                const char *what);
void vs_say_done(const char *msg);
void vs_fail_report(const char *what, char *fail_msg);
json_t *vs_setup(const char *sock, const char *disk, QmpConn **cp, Graph *g);
int vs_parse_opts(int argc, char **argv, const VOpt *opts, int npos, const char *const *pos_names);
int vs_parse_job_opts(int argc, char **argv, JobOpts *j, const VOpt *extra, int npos,
                      const char *const *pos_names);
int64_t vs_timeout_ms_of(const char *arg, int *ok);
int vs_job_opts_numbers(const JobOpts *jo, int64_t *timeout_ms, int64_t *speed);
int vs_check_blocking(bool blocking, bool verbose, bool async, const char *finish_opt);
json_t *vs_job_run_args(JobRun *r, json_t *node);
int vs_job_run_start(JobRun *r, const JobKind *k, json_t *args, bool blocking,
                     const char *started, bool verbose, bool want_ready, int64_t timeout_ms,
                     bool async);
int vs_job_run_finish(JobRun *r, const char *disk, bool pivot, const char *done_msg);
void vs_job_run_end(JobRun *r);

/* ---- virsh-graph.c: disks and backing chains from query-named-block-nodes ---- */
void vs_graph_free(Graph *g);
int vs_graph_load(QmpConn *c, Graph *g, VdError **errp);
const char *vs_jstr(json_t *o, const char *key);
json_t *vs_node_by_name(Graph *g, const char *name);
json_t *vs_backing_node(Graph *g, json_t *n);
json_t *vs_skip_filter(Graph *g, json_t *n);
json_t *vs_resolve_disk(Graph *g, const char *disk, VdError **errp);
int vs_set_chain_arg(Graph *g, json_t *args, const char *key, const char *value);
int vs_set_absolute_backing(Graph *g, json_t *args, json_t *top);

#endif
