/*
 * tool.h - shared helpers of the offline `vdisk` tool (qemu-img / qemu-io compatible front end).
 *
 * Every command is `int img_<name>(int argc, char **argv)` with argv[0] = the command name; it
 * returns the process exit status. Errors reach the user as "vdisk: ..." lines on stderr, worded
 * and split into lines as qemu-img 7.2 does (usage errors add qemu-img's "Try ..." line).
 * The tool never implements image-format logic: everything goes through src/block/block.h.
 */
#ifndef VDISK_TOOLS_TOOL_H
#define VDISK_TOOLS_TOOL_H

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "block/block.h"

#define TOOL_NAME "vdisk"
/* Copy buffer size (convert, commit, rebase, compare). */
#define TOOL_BUF_SIZE (2u << 20)

/* Set by --allow-probe (anywhere on the command line): backing files may be probed. */
extern bool tool_allow_probe;

/* Long-option ids shared by the commands (values above any short option letter). */
enum {
    OPT_OUTPUT = 256,
    OPT_BACKING_CHAIN,
    OPT_SIZE,
    OPT_SHRINK,
    OPT_PREALLOCATION,
    OPT_TARGET_IS_ZERO,
    OPT_TARGET_IMAGE_OPTS,
    OPT_HELP,
    OPT_IMAGE_OPTS,
    OPT_OBJECT,
    OPT_BITMAPS,
    OPT_SKIP_BROKEN_BITMAPS,
    OPT_SALVAGE,
};

/* "usage: vdisk CMD ...": CMD's syntax as `vdisk --help` lists it (the one table, in vdisk.c). */
void tool_print_usage(const char *cmd);
/* "vdisk: msg" on stderr. */
void tool_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "vdisk: warning: msg" on stderr (QEMU's warn_report). */
void tool_warning(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Print err (optionally prefixed "prefix: ") and free it. */
void tool_report(VdError *err, const char *prefix);
/*
 * A usage error as qemu-img's error_exit prints it: "vdisk: msg", then the line
 * "Try 'vdisk --help' for more information". The caller exits 1.
 */
void tool_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* getopt helpers: report an unknown option / missing argument the qemu-img way (a usage error). */
void tool_bad_option(const char *cmd, int optopt_char, const char *arg);

/* Parse a size with optional k/M/G/T/P/E suffix (qemu_strtosz rules; fractions allowed). */
int tool_parse_size(const char *s, uint64_t *out);
/* qemu-img's cvtnum message for a size it cannot parse (on one line; qemu-img uses two). */
void tool_invalid_size(const char *what);
/*
 * qemu-img's cvtnum: VALUE as a size in [min, max] into *out; -1 after its message ("Invalid NAME
 * specified. You may use k, M, ..." for junk, "... Must be between MIN and MAX." out of range).
 */
int tool_cvtnum(const char *name, const char *value, uint64_t min, uint64_t max, uint64_t *out);
/* Parse a plain non-negative integer (decimal/hex/octal) fully; -EINVAL on junk. */
int tool_parse_uint(const char *s, uint64_t *out);
/* Parse an --output argument; returns 0 human, 1 json, -1 error (already reported). */
int tool_parse_output(const char *arg);
/* The one filename operand left after getopt, or NULL after "Expecting one image file name". */
const char *tool_one_image(int argc, char **argv);
/* qemu's size_to_str ("1 GiB", "196 KiB", "1.5 MiB") into buf. */
void tool_size_to_str(uint64_t val, char *buf, size_t len);
/* qemu-io's cvtstr ("64 KiB", "1.500 KiB", "512 bytes"). */
void tool_cvtstr(double value, char *buf, size_t len);

/* Open flags for images the user named; adds FORCE_SHARE for -U and ALLOW_PROBE when requested. */
int tool_open_flags(int flags, bool force_share);
/*
 * Open flags for a -t/-T cache mode (none/off/directsync: O_DIRECT, unsafe: no flushes,
 * writeback/writethrough: neither); -1 for a name qemu-img refuses (caller prints its message).
 */
int tool_cache_flags(const char *mode, int *flags);
/* Set by --image-opts: the image operands are option lists (driver=...,file.filename=...). */
extern bool tool_image_opts;
/*
 * Open an image the user named (prints the error, returns NULL on failure); with --image-opts
 * filename is an option list. tool_open_plain: always a file name (convert's and dd's targets).
 */
BlockNode *tool_open(const char *filename, const char *fmt, int flags);
/* Open an image named by an option list (--image-opts, convert's --target-image-opts). */
BlockNode *tool_open_image_opts(const char *optstr, const char *fmt, int flags);
BlockNode *tool_open_plain(const char *filename, const char *fmt, int flags);
/* tool_open of an encrypted image with the password in secret object key_secret (NULL: none). */
BlockNode *tool_open_keyed(const char *filename, const char *fmt, int flags,
                           const char *key_secret);

/* Is buf[0..len) all zero? (fast path via memcmp) */
bool tool_is_zero(const void *buf, size_t len);

/*
 * A second thread for overlapping two page-cache copies (tool-worker.c): submit runs fn(arg) in
 * the background (after the previous task ended), wait returns its result. new returns NULL when
 * no thread can be created (report it as out of memory); free waits for a running task.
 */
typedef struct ToolWorker ToolWorker;
typedef int (*ToolTask)(void *arg);
ToolWorker *tool_worker_new(void);
void tool_worker_submit(ToolWorker *w, ToolTask fn, void *arg);
int tool_worker_wait(ToolWorker *w);
void tool_worker_free(ToolWorker *w);

/* A pread as a ToolTask: reads [off, off+n) of bs into buf (zeros past len when len >= 0). */
typedef struct ToolRead {
    BlockNode *bs;    /* NULL reads zeros */
    int64_t len;      /* < 0: no bound (plain vd_pread) */
    uint64_t off, n;
    uint8_t *buf;
} ToolRead;
int tool_read_task(void *arg);

/* `-r rate_limit` (tool-ratelimit.c): write at most rate bytes per second (0 = no limit). */
typedef struct ToolRate {
    uint64_t rate;
    double start; /* CLOCK_MONOTONIC seconds of the first request, < 0 before it */
    uint64_t sent;
    pthread_mutex_t lock;
} ToolRate;
/* Parse -r's argument (size suffixes); qemu-img's "Invalid rate limit specified" on error. */
int tool_parse_rate(const char *arg, uint64_t *rate);
void tool_rate_init(ToolRate *r, uint64_t bytes_per_sec);
void tool_rate_destroy(ToolRate *r);
/* A request size that keeps the pace even (<= chunk). */
uint64_t tool_rate_chunk(const ToolRate *r, uint64_t chunk);
/* Wait until `bytes` more may be written. */
void tool_rate_wait(ToolRate *r, uint64_t bytes);

/* qemu-img progress (-p): "    (x.xx/100%)\r" on stdout. */
void progress_init(bool enabled, float min_skip);
void progress_print(float delta, int max);
void progress_end(void);

/* Print a JSON value the way QEMU's pretty printer does (key order = QEMU's QDict order). */
void qjson_print(FILE *f, json_t *v);
/* qemu-img's "Snapshot list:" table of a "snapshots" array (info, snapshot -l). */
void tool_snapshot_dump(json_t *snaps);
/* qemu's human dump of a dict (keys '-' -> ' '), indentation in units of 4 spaces. */
void qdict_dump_human(FILE *f, json_t *obj, int indentation);

/* "-o" option lists: key=value[,key=value] with ",," escaping a comma. */
typedef struct ToolOpt {
    char *key;
    char *value;
} ToolOpt;
typedef struct ToolOpts {
    ToolOpt *v;
    int n;
} ToolOpts;
int tool_opts_parse(ToolOpts *o, const char *s);
/* Add one -o argument to *acc (joined with ','; later keys win); qemu-img's "Invalid option
 * list" (or out of memory) is printed and -1 returned when it cannot be added. */
int tool_append_opts(char **acc, const char *arg);
const char *tool_opts_get(const ToolOpts *o, const char *key);
void tool_opts_free(ToolOpts *o);
/* The image format (not a protocol) named FMT, with the -o string OPTSTR (may be NULL) parsed into
 * O; NULL after "Unknown file format" or "out of memory". */
const BlockDriver *tool_create_format(const char *fmt, const char *optstr, ToolOpts *o);

/*
 * Fill VdCreateOptions from -o options for `fmt`. Strings in *co point into `o`.
 * Records the options the user set so tool_print_formatting can print them.
 * Returns 0 or -1 (error printed).
 */
typedef struct CreateSpec {
    VdCreateOptions co;
    const ToolOpts *o;
    char size_buf[32];
} CreateSpec;
/*
 * Who reads the -o list decides how its errors read, as in qemu-img: create puts "FILE: " before
 * every one; convert names nothing for a malformed list and says "FILE: error while converting
 * FMT: " before a value the format refuses; measure names nothing and ends a malformed list's
 * error with "Invalid options for file format 'FMT'".
 */
typedef enum { TOOL_OPTS_CREATE, TOOL_OPTS_CONVERT, TOOL_OPTS_MEASURE } ToolOptsUse;
int tool_create_options(CreateSpec *spec, const char *fmt, const ToolOpts *o, const char *filename,
                        ToolOptsUse use);
/* A create error of the library (vd_create's), as USE's qemu-img command words it. */
void tool_create_report(VdError *err, const char *fmt, const char *filename, ToolOptsUse use);
/* QEMU's three lines for a size option (or resize's size) it cannot parse, after PREFIX. */
void tool_size_opt_error(const char *prefix, const char *name);
/* "Formatting 'f', fmt=qcow2 cluster_size=65536 ..." exactly like qemu-img. */
void tool_print_formatting(const char *filename, const CreateSpec *spec);
/* Print the -o help for a format. */
void tool_print_create_help(const char *fmt, const char *target);

/* `-l snapshot_param` (convert, measure): "snapshot.id=ID,snapshot.name=NAME" or an id or name. */
typedef struct ToolSnapParam {
    bool given;             /* the snapshot.* form */
    const char *id, *name;  /* snapshot.id / snapshot.name (point into opts), may be NULL */
    const char *id_or_name; /* the plain form */
    ToolOpts opts;
} ToolSnapParam;
/* 0, or -1 after qemu-img's "Failed in parsing snapshot param" message. */
int tool_snapshot_param_parse(const char *arg, ToolSnapParam *p);
/* Open filename read-only at the snapshot p selects (none selected: the active image). */
BlockNode *tool_open_snapshot(const char *filename, const char *fmt, int flags,
                              const ToolSnapParam *p);

/* Commands. */
int img_amend(int argc, char **argv);
int img_create(int argc, char **argv);
int img_info(int argc, char **argv);
int img_map(int argc, char **argv);
int img_check(int argc, char **argv);
int img_compare(int argc, char **argv);
int img_convert(int argc, char **argv);
int img_commit(int argc, char **argv);
int img_rebase(int argc, char **argv);
int img_resize(int argc, char **argv);
int img_measure(int argc, char **argv);
int img_io(int argc, char **argv);
int img_snapshot(int argc, char **argv);
int img_dd(int argc, char **argv);
int img_bench(int argc, char **argv);
int img_bitmap(int argc, char **argv);

#endif
