/*
 * virsh-copy.c - the job-starting commands of `vdisk`: blockcopy (drive-mirror), blockpull
 * (block-stream), blockcommit (block-commit). Output and exit status follow virsh; errors are
 * one "vdisk: error: ..." line and exit status 1 (also for a job that failed or was aborted).
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
    int p = vs_parse_job_opts(argc, argv, &jo, opts, 2, names);
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
    int64_t timeout_ms = vs_timeout_ms_of(jo.timeout_s, &ok);
    if (!ok) {
        return 1;
    }
    bool blocking = jo.wait || pivot || finish || timeout_ms > 0;
    if (vs_check_blocking(blocking, jo.verbose, jo.async, "--finish") < 0) {
        return 1;
    }
    int64_t speed = 0;
    uint64_t granularity = 0, buf_size = 0;
    if ((jo.bw && vs_bandwidth_to_speed(jo.bw, jo.bytes, &speed) < 0) ||
        (gran && vs_parse_num("granularity", gran, &granularity) < 0) ||
        (bufsz && vs_parse_num("buf-size", bufsz, &buf_size) < 0)) {
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
    json_t *node = vs_setup(jo.sock, disk, &run.conn, &run.g);
    json_t *args = node ? vs_job_run_args(&run, node) : NULL;
    if (!args) {
        goto out;
    }
    target = vs_absolute_path(dest);
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
    int st = vs_job_run_start(&run, &kind, args, blocking, "Block Copy started", jo.verbose, true,
                              timeout_ms, jo.async);
    if (st <= 0) {
        ret = st < 0;
        goto out;
    }
    if (pivot || finish) {
        if (vs_job_run_finish(&run, disk, pivot,
                              pivot ? "Successfully pivoted" : "Successfully copied") < 0) {
            goto out;
        }
    } else {
        vs_say_done("Now in mirroring phase");
    }
    ret = 0;
out:
    free(target);
    vs_job_run_end(&run);
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
    int p = vs_parse_job_opts(argc, argv, &jo, opts, 1, names);
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
    if (vs_job_opts_numbers(&jo, &timeout_ms, &speed) < 0) {
        return 1;
    }

    static const JobKind kind = { "block-stream", "Block Pull", "Pull aborted", "Pull failed",
                                  "block pull failed" };
    int ret = 1;
    JobRun run = { 0 };
    json_t *node = vs_setup(jo.sock, disk, &run.conn, &run.g);
    json_t *args = node ? vs_job_run_args(&run, node) : NULL;
    if (!args) {
        goto out;
    }
    if (base && (vs_set_chain_arg(&run.g, args, "base", base) < 0 ||
                 (jo.absolute && vs_set_absolute_backing(&run.g, args, node) < 0))) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    if (speed) {
        json_object_set_new(args, "speed", json_integer(speed));
    }
    int st = vs_job_run_start(&run, &kind, args, jo.wait, "Block Pull started", jo.verbose, false,
                              timeout_ms, jo.async);
    if (st <= 0) {
        ret = st < 0;
        goto out;
    }
    vs_say_done("Pull complete");
    ret = 0;
out:
    vs_job_run_end(&run);
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
    int p = vs_parse_job_opts(argc, argv, &jo, opts, 1, names);
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
    if (vs_job_opts_numbers(&jo, &timeout_ms, &speed) < 0) {
        return 1;
    }
    active = active || pivot || keep;
    bool blocking = jo.wait || pivot || keep || timeout_ms > 0;
    if (vs_check_blocking(blocking, jo.verbose, jo.async, "--keep-overlay") < 0) {
        return 1;
    }

    static const JobKind kind = { "block-commit", "Block commit", "Commit aborted",
                                  "Commit failed", "block commit failed" };
    int ret = 1;
    JobRun run = { 0 };
    json_t *node = vs_setup(jo.sock, disk, &run.conn, &run.g);
    if (!node) {
        goto out;
    }
    /* Which layer is the top? (libvirt's checks: active commit iff top is the active layer) */
    json_t *top_node = node;
    if (top) {
        VdError *terr = NULL;
        top_node = vs_resolve_disk(&run.g, top, &terr);
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
    json_t *args = vs_job_run_args(&run, node);
    if (!args) {
        goto out;
    }
    if (!active && vs_set_chain_arg(&run.g, args, "top", top) < 0) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    if (shallow) {
        json_t *b = top_node ? vs_backing_node(&run.g, top_node) : NULL;
        if (!b) {
            tool_error("error: could not find the backing image of '%s'", top ? top : disk);
            json_decref(args);
            goto out;
        }
        json_object_set_new(args, "base-node", json_string(vs_jstr(b, "node-name")));
    } else if (base && vs_set_chain_arg(&run.g, args, "base", base) < 0) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    /* An active commit rewrites no header (QEMU refuses backing-file for it). */
    if (jo.absolute && !active && vs_set_absolute_backing(&run.g, args, top_node) < 0) {
        tool_error("error: out of memory");
        json_decref(args);
        goto out;
    }
    if (speed) {
        json_object_set_new(args, "speed", json_integer(speed));
    }
    int st = vs_job_run_start(&run, &kind, args, blocking,
                              active ? "Active Block Commit started" : "Block Commit started",
                              jo.verbose, active, timeout_ms, jo.async);
    if (st <= 0) {
        ret = st < 0;
        goto out;
    }
    if (active && (pivot || keep)) {
        const char *msg = pivot ? "Successfully pivoted" : "Commit complete, overlay image kept";
        if (vs_job_run_finish(&run, disk, pivot, msg) < 0) {
            goto out;
        }
    } else if (active) {
        vs_say_done("Now in synchronized phase");
    } else {
        vs_say_done("Commit complete");
    }
    ret = 0;
out:
    vs_job_run_end(&run);
    return ret;
}
