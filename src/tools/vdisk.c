/*
 * vdisk.c - the offline `vdisk` tool: dispatch `vdisk <command> [options]` and the helpers all
 * commands share (size parsing, qemu-style human/JSON printing, progress, -o option lists).
 * Output text, JSON keys and exit codes follow qemu-img 7.2 (and qemu-io for `vdisk io`).
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/tool.h"
#include "tools/virsh.h"
#include "util/qjson.h"
#include "util/secret.h"

bool tool_allow_probe;
bool tool_image_opts;

/* "vdisk: " and kind, the message, then end; stdout is flushed first, so lines keep their order. */
static void tool_vmessage(const char *kind, const char *end, const char *fmt, va_list ap)
{
    fflush(stdout);
    fputs(TOOL_NAME ": ", stderr);
    fputs(kind, stderr);
    vfprintf(stderr, fmt, ap);
    fputs(end, stderr);
}

void tool_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tool_vmessage("", "\n", fmt, ap);
    va_end(ap);
}

void tool_warning(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tool_vmessage("warning: ", "\n", fmt, ap);
    va_end(ap);
}

void tool_report(VdError *err, const char *prefix)
{
    if (prefix) {
        tool_error("%s: %s", prefix, vd_error_msg(err));
    } else {
        tool_error("%s", vd_error_msg(err));
    }
    vd_error_free(err);
}

void tool_usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tool_vmessage("", "\nTry '" TOOL_NAME " --help' for more information\n", fmt, ap);
    va_end(ap);
}

void tool_bad_option(const char *cmd, int c, const char *arg)
{
    (void)cmd;
    if (c == ':') {
        tool_usage_error("missing argument for option '%s'", arg);
    } else {
        tool_usage_error("unrecognized option '%s'", arg);
    }
}

/* ---- numbers ---- */

void tool_invalid_size(const char *what)
{
    /* qemu-img's two lines, each with the program's name */
    tool_error("Invalid %s specified. You may use k, M, G, T, P or E suffixes for", what);
    tool_error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
}

int tool_cvtnum(const char *name, const char *value, uint64_t min, uint64_t max, uint64_t *out)
{
    uint64_t v;
    int r = tool_parse_size(value, &v);
    if (r < 0 && r != -ERANGE) {
        tool_invalid_size(name);
        return -1;
    }
    if (r < 0 || v < min || v > max) {
        tool_error("Invalid %s specified. Must be between %" PRIu64 " and %" PRIu64 ".", name,
                   min, max);
        return -1;
    }
    *out = v;
    return 0;
}

int tool_parse_uint(const char *s, uint64_t *out)
{
    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ') {
        return -EINVAL;
    }
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) {
        return errno ? -errno : -EINVAL;
    }
    *out = v;
    return 0;
}

int tool_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s) {
        return -EINVAL;
    }
    const char *p = s;
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    if (*p == '-' || *p == '+') {
        return -EINVAL;
    }
    char *end;
    uint64_t ival;
    double frac = 0;
    errno = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        ival = strtoull(p, &end, 16);
        if (end == p + 2) {
            return -EINVAL;
        }
    } else {
        ival = strtoull(p, &end, 10);
        if (end == p) {
            return -EINVAL;
        }
        if (*end == '.') {
            char *fend;
            frac = strtod(end, &fend);
            if (fend == end) {
                fend = end + 1; /* "1." or "1.k": an empty fraction */
                frac = 0;
            }
            end = fend;
        }
    }
    if (errno == ERANGE) {
        return -ERANGE;
    }
    uint64_t mul = 1;
    switch (*end) {
    case 'b': case 'B': mul = 1; end++; break;
    case 'k': case 'K': mul = 1ull << 10; end++; break;
    case 'm': case 'M': mul = 1ull << 20; end++; break;
    case 'g': case 'G': mul = 1ull << 30; end++; break;
    case 't': case 'T': mul = 1ull << 40; end++; break;
    case 'p': case 'P': mul = 1ull << 50; end++; break;
    case 'e': case 'E': mul = 1ull << 60; end++; break;
    case '\0': break;
    default: return -EINVAL;
    }
    if (*end) {
        return -EINVAL;
    }
    if (frac != 0 && mul == 1) {
        return -EINVAL; /* a fraction of a byte */
    }
    if (ival > UINT64_MAX / mul) {
        return -ERANGE;
    }
    uint64_t v = ival * mul;
    uint64_t f = (uint64_t)(frac * (double)mul);
    if (v + f < v) {
        return -ERANGE;
    }
    *out = v + f;
    return 0;
}

int tool_parse_output(const char *arg)
{
    if (!arg || !strcmp(arg, "human")) {
        return 0;
    }
    if (!strcmp(arg, "json")) {
        return 1;
    }
    tool_error("--output must be used with human or json as argument.");
    return -1;
}

const char *tool_one_image(int argc, char **argv)
{
    if (optind != argc - 1) {
        tool_usage_error("Expecting one image file name");
        return NULL;
    }
    return argv[optind];
}

void tool_size_to_str(uint64_t val, char *buf, size_t len)
{
    static const char *suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
    int i;
    /* Switch to the next unit once the integer part reaches 1000 (as QEMU does). */
    frexp(val / (1000.0 / 1024.0), &i);
    i = (i - 1) / 10;
    if (i < 0) {
        i = 0;
    }
    if (i > 6) {
        i = 6;
    }
    uint64_t div = 1ULL << (i * 10);
    snprintf(buf, len, "%0.3g %sB", (double)val / div, suffixes[i]);
}

void tool_cvtstr(double value, char *str, size_t size)
{
    const char *suffix;
    char num[64];
    if (value >= (double)(1ULL << 60)) {
        suffix = " EiB";
        snprintf(num, sizeof(num), "%.3f", value / (double)(1ULL << 60));
    } else if (value >= (double)(1ULL << 50)) {
        suffix = " PiB";
        snprintf(num, sizeof(num), "%.3f", value / (double)(1ULL << 50));
    } else if (value >= (double)(1ULL << 40)) {
        suffix = " TiB";
        snprintf(num, sizeof(num), "%.3f", value / (double)(1ULL << 40));
    } else if (value >= (double)(1ULL << 30)) {
        suffix = " GiB";
        snprintf(num, sizeof(num), "%.3f", value / (double)(1ULL << 30));
    } else if (value >= (double)(1ULL << 20)) {
        suffix = " MiB";
        snprintf(num, sizeof(num), "%.3f", value / (double)(1ULL << 20));
    } else if (value >= 1024.0) {
        suffix = " KiB";
        snprintf(num, sizeof(num), "%.3f", value / 1024.0);
    } else {
        suffix = " bytes";
        snprintf(num, sizeof(num), "%f", value);
    }
    char *trim = strstr(num, ".000");
    if (trim) {
        *trim = '\0';
    }
    snprintf(str, size, "%s%s", num, suffix);
}

bool tool_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    if (len == 0) {
        return true;
    }
    /* Check a few bytes first: data buffers usually differ early. */
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++) {
        if (p[i]) {
            return false;
        }
    }
    return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}

/* ---- opening ---- */

int tool_open_flags(int flags, bool force_share)
{
    if (force_share) {
        flags |= VD_OPEN_FORCE_SHARE;
    }
    if (tool_allow_probe) {
        flags |= VD_OPEN_ALLOW_PROBE;
    }
    return flags;
}

int tool_cache_flags(const char *mode, int *flags)
{
    /* bdrv_parse_cache_mode's names; "off" is an old spelling of "none" */
    if (!strcmp(mode, "none") || !strcmp(mode, "off")) {
        *flags = VD_OPEN_DIRECT;
    } else if (!strcmp(mode, "directsync")) {
        *flags = VD_OPEN_DIRECT | VD_OPEN_WRITETHROUGH;
    } else if (!strcmp(mode, "unsafe")) {
        *flags = VD_OPEN_NO_FLUSH;
    } else if (!strcmp(mode, "writethrough")) {
        *flags = VD_OPEN_WRITETHROUGH;
    } else if (!strcmp(mode, "writeback")) {
        *flags = 0;
    } else {
        return -1;
    }
    return 0;
}

/* --image-opts: FILENAME is "driver=...,file.filename=..." (QEMU's keyval). */
BlockNode *tool_open_image_opts(const char *optstr, const char *fmt, int flags)
{
    if (fmt) {
        tool_error("--image-opts and --format are mutually exclusive");
        return NULL;
    }
    VdError *err = NULL;
    json_t *o = vd_options_parse_keyval(optstr, &err);
    BlockNode *bs = o ? vd_open_options(o, tool_open_flags(flags, false), false, &err) : NULL;
    json_decref(o);
    if (!bs) {
        tool_error("Could not open '%s': %s", optstr, vd_error_msg(err));
        vd_error_free(err);
    }
    return bs;
}

BlockNode *tool_open(const char *filename, const char *fmt, int flags)
{
    return tool_image_opts ? tool_open_image_opts(filename, fmt, flags)
                           : tool_open_plain(filename, fmt, flags);
}

BlockNode *tool_open_plain(const char *filename, const char *fmt, int flags)
{
    return tool_open_keyed(filename, fmt, flags, NULL);
}

BlockNode *tool_open_keyed(const char *filename, const char *fmt, int flags,
                           const char *key_secret)
{
    VdError *err = NULL;
    /* qemu-img's wording: "Could not open 'F': " before the cause (which may name F again) */
    if (fmt && !vd_find_driver(fmt)) {
        tool_error("Could not open '%s': Unknown driver '%s'", filename, fmt);
        return NULL;
    }
    VdOpenOptions oo = {.filename = filename, .format = fmt,
                        .flags = tool_open_flags(flags, false), .key_secret = key_secret};
    BlockNode *bs = vd_open(&oo, &err);
    if (!bs) {
        if (err) {
            char *prefix = NULL;
            if (asprintf(&prefix, "Could not open '%s'", filename) < 0) {
                prefix = NULL;
            }
            tool_report(err, prefix);
            free(prefix);
        } else {
            tool_error("Could not open '%s'", filename);
        }
    }
    return bs;
}

/* ---- progress (qemu-progress.c behaviour) ---- */

static struct {
    bool enabled;
    float current, last_print, min_skip;
} progress;

static void progress_show(void)
{
    printf("    (%3.2f/100%%)\r", progress.current);
    fflush(stdout);
}

void progress_init(bool enabled, float min_skip)
{
    progress.enabled = enabled;
    progress.current = progress.last_print = 0;
    progress.min_skip = min_skip;
}

void progress_print(float delta, int max)
{
    if (!progress.enabled) {
        return;
    }
    float current = max == 0 ? delta : progress.current + delta / 100 * max;
    current = current > 100 ? 100 : current; /* rebase's fixed steps can add up past it */
    progress.current = current; /* also when not shown: small steps add up (QEMU's) */
    if (current > progress.last_print + progress.min_skip ||
        current < progress.last_print - progress.min_skip || current == 100 || current == 0) {
        progress.last_print = current;
        progress_show();
    }
}

void progress_end(void)
{
    if (progress.enabled) {
        printf("\n");
        fflush(stdout);
    }
}

/* ---- QEMU-style JSON ---- */

static void qjson_value(FILE *f, json_t *v, int depth)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t n;
        VdQKey *ents = vd_qdict_order(v, &n);
        fputc('{', f);
        for (size_t i = 0; i < n; i++) {
            fprintf(f, "%s\n%*s", i ? "," : "", (depth + 1) * 4, "");
            vd_qjson_string(f, ents[i].key);
            fputs(": ", f);
            qjson_value(f, ents[i].val, depth + 1);
        }
        fprintf(f, "\n%*s}", depth * 4, "");
        free(ents);
        break;
    }
    case JSON_ARRAY: {
        fputc('[', f);
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            fprintf(f, "%s\n%*s", i ? "," : "", (depth + 1) * 4, "");
            qjson_value(f, e, depth + 1);
        }
        fprintf(f, "\n%*s]", depth * 4, "");
        break;
    }
    case JSON_STRING:
        vd_qjson_string(f, json_string_value(v));
        break;
    case JSON_INTEGER:
        fprintf(f, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        fprintf(f, "%.17g", json_real_value(v));
        break;
    case JSON_TRUE:
        fputs("true", f);
        break;
    case JSON_FALSE:
        fputs("false", f);
        break;
    case JSON_NULL:
        fputs("null", f);
        break;
    }
}

void qjson_print(FILE *f, json_t *v)
{
    qjson_value(f, v, 0);
    fputc('\n', f);
}

static void dump_qobject(FILE *f, int indent, json_t *v);

static void dump_qlist(FILE *f, int indent, json_t *list)
{
    size_t i;
    json_t *e;
    json_array_foreach(list, i, e) {
        bool composite = json_is_object(e) || json_is_array(e);
        fprintf(f, "%*s[%zu]:%c", indent * 4, "", i, composite ? '\n' : ' ');
        dump_qobject(f, indent + 1, e);
        if (!composite) {
            fputc('\n', f);
        }
    }
}

void qdict_dump_human(FILE *f, json_t *obj, int indent)
{
    size_t n;
    VdQKey *ents = vd_qdict_order(obj, &n);
    for (size_t i = 0; i < n; i++) {
        bool composite = json_is_object(ents[i].val) || json_is_array(ents[i].val);
        fprintf(f, "%*s", indent * 4, "");
        for (const char *k = ents[i].key; *k; k++) {
            fputc(*k == '-' ? ' ' : *k, f);
        }
        fputc(':', f);
        fputc(composite ? '\n' : ' ', f);
        dump_qobject(f, indent + 1, ents[i].val);
        if (!composite) {
            fputc('\n', f);
        }
    }
    free(ents);
}

static void dump_qobject(FILE *f, int indent, json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: qdict_dump_human(f, v, indent); break;
    case JSON_ARRAY: dump_qlist(f, indent, v); break;
    case JSON_STRING: fputs(json_string_value(v), f); break;
    case JSON_INTEGER: fprintf(f, "%" JSON_INTEGER_FORMAT, json_integer_value(v)); break;
    case JSON_REAL: fprintf(f, "%g", json_real_value(v)); break;
    case JSON_TRUE: fputs("true", f); break;
    case JSON_FALSE: fputs("false", f); break;
    case JSON_NULL: fputs("null", f); break;
    }
}

/* ---- -o option lists ---- */

int tool_opts_parse(ToolOpts *o, const char *s)
{
    const char *p = s;
    while (*p) {
        /* One item up to an unescaped comma; ",," is a literal comma. */
        size_t cap = strlen(p) + 1;
        char *item = malloc(cap);
        if (!item) {
            return -ENOMEM;
        }
        size_t n = 0;
        while (*p) {
            if (*p == ',') {
                if (p[1] == ',') {
                    item[n++] = ',';
                    p += 2;
                    continue;
                }
                p++;
                break;
            }
            item[n++] = *p++;
        }
        item[n] = '\0';
        if (n == 0) {
            free(item);
            continue;
        }
        ToolOpt *nv = realloc(o->v, (o->n + 1) * sizeof(*nv));
        if (!nv) {
            free(item);
            return -ENOMEM;
        }
        o->v = nv;
        char *eq = strchr(item, '=');
        char *key, *value;
        if (eq) {
            *eq = '\0';
            key = item;
            value = strdup(eq + 1);
        } else {
            /* "help" or a bare flag; qemu treats "key" as "key=on" for bools. */
            key = item;
            value = NULL;
        }
        if (eq && !value) {
            free(item);
            return -ENOMEM;
        }
        /* A later occurrence overrides an earlier one. */
        for (int i = 0; i < o->n; i++) {
            if (!strcmp(o->v[i].key, key)) {
                free(o->v[i].key);
                free(o->v[i].value);
                o->v[i] = o->v[--o->n];
                break;
            }
        }
        o->v[o->n].key = key;
        o->v[o->n].value = value;
        o->n++;
    }
    return 0;
}

int tool_append_opts(char **acc, const char *arg)
{
    /* qemu-img refuses a list that would merge wrongly with its neighbours once joined with
     * ',': empty, starting with ',' or ending with an odd number of ',' (an escaped one) */
    size_t len = strlen(arg), i = len;
    while (i > 0 && arg[i - 1] == ',') {
        i--;
    }
    if (!len || arg[0] == ',' || (len - i) % 2) {
        tool_error("Invalid option list: %s", arg);
        return -1;
    }
    char *n = NULL;
    if (asprintf(&n, "%s%s%s", *acc ? *acc : "", *acc ? "," : "", arg) < 0) {
        tool_error("out of memory");
        return -1;
    }
    free(*acc);
    *acc = n;
    return 0;
}

const BlockDriver *tool_create_format(const char *fmt, const char *optstr, ToolOpts *o)
{
    const BlockDriver *drv = vd_find_driver(fmt);
    if (!drv || drv->is_protocol) {
        tool_error("Unknown file format '%s'", fmt);
        return NULL;
    }
    if (optstr && tool_opts_parse(o, optstr) < 0) {
        tool_error("out of memory");
        return NULL;
    }
    return drv;
}

const char *tool_opts_get(const ToolOpts *o, const char *key)
{
    for (int i = 0; o && i < o->n; i++) {
        if (!strcmp(o->v[i].key, key)) {
            return o->v[i].value ? o->v[i].value : "on";
        }
    }
    return NULL;
}

void tool_opts_free(ToolOpts *o)
{
    for (int i = 0; i < o->n; i++) {
        free(o->v[i].key);
        free(o->v[i].value);
    }
    free(o->v);
    o->v = NULL;
    o->n = 0;
}

static const char *const qcow2_opt_names[] = {
    "size", "backing_file", "backing_fmt", "cluster_size", "compat", "lazy_refcounts",
    "refcount_bits", "preallocation", "extended_l2", "compression_type", "data_file",
    "data_file_raw", "encryption",
    "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
    "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time",
    "nocow", "extent_size_hint", NULL
};
static const char *const raw_opt_names[] = {
    "size", "preallocation", "nocow", "extent_size_hint", NULL
};
/* QEMU's LUKS create options, in the order qemu-img prints them (qcow2: "encrypt." before each) */
static const char *const luks_opt_names[] = {
    "size", "key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
    "hash-alg", "iter-time", "preallocation", "nocow", "extent_size_hint", NULL
};

/* Where -o errors go and how they read (ToolOptsUse in tool.h). */
typedef struct OptsCtx {
    const char *fmt, *filename;
    ToolOptsUse use;
} OptsCtx;

void tool_size_opt_error(const char *prefix, const char *name)
{
    tool_error("%sParameter '%s' expects a non-negative number below 2^64", prefix, name);
    fputs("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
          "and exabytes, respectively.\n", stderr);
}

static void create_error(const OptsCtx *c, const char *msg)
{
    switch (c->use) {
    case TOOL_OPTS_CREATE: tool_error("%s: %s", c->filename, msg); break;
    case TOOL_OPTS_CONVERT:
        tool_error("%s: error while converting %s: %s", c->filename, c->fmt, msg);
        break;
    case TOOL_OPTS_MEASURE: tool_error("%s", msg); break;
    }
}

/*
 * What an -o error is: OPTS_SYNTAX, the list itself is malformed (QemuOpts' errors: unknown key,
 * a value of the wrong type); OPTS_VALUE, the format refuses a well-formed value (the driver's
 * create errors). They read alike but for convert (the create error's prefix) and measure (a
 * second line after a syntax error).
 */
typedef enum { OPTS_SYNTAX, OPTS_VALUE } OptsFault;

static void opts_error(const OptsCtx *c, OptsFault kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void opts_error(const OptsCtx *c, OptsFault kind, const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    if (n < 0) {
        tool_error("out of memory");
        return;
    }
    if (kind == OPTS_SYNTAX && c->use == TOOL_OPTS_CONVERT) {
        tool_error("%s", msg);
    } else {
        create_error(c, msg);
    }
    if (kind == OPTS_SYNTAX && c->use == TOOL_OPTS_MEASURE) {
        tool_error("Invalid options for file format '%s'", c->fmt);
    }
    free(msg);
}

/* A size-typed option's value QemuOpts cannot take: junk, or beyond 2^64. */
static void opts_size_error(const OptsCtx *c, const char *name, const char *value, int r)
{
    if (r == -ERANGE) {
        opts_error(c, OPTS_SYNTAX, "Value '%s' is out of range for parameter '%s'", value, name);
        return;
    }
    char *prefix = NULL;
    if (c->use == TOOL_OPTS_CREATE && asprintf(&prefix, "%s: ", c->filename) < 0) {
        prefix = NULL;
    }
    tool_size_opt_error(prefix ? prefix : "", name);
    free(prefix);
    if (c->use == TOOL_OPTS_MEASURE) {
        tool_error("Invalid options for file format '%s'", c->fmt);
    }
}

void tool_create_report(VdError *err, const char *fmt, const char *filename, ToolOptsUse use)
{
    OptsCtx c = { .fmt = fmt, .filename = filename, .use = use };
    create_error(&c, vd_error_msg(err));
    vd_error_free(err);
}

/* A number-typed option (QemuOpts' NUMBER). */
static int opts_number(const OptsCtx *c, const char *name, const char *v, uint64_t *out)
{
    if (tool_parse_uint(v, out) < 0) {
        opts_error(c, OPTS_SYNTAX, "Parameter '%s' expects a number", name);
        return -1;
    }
    return 0;
}

/* The LUKS members of co from -o (names after prefix: "" for luks, "encrypt." for qcow2). */
static int luks_create_options(VdCreateOptions *co, const ToolOpts *o, const char *prefix,
                               const OptsCtx *c)
{
    char key[64];
#define LUKS_OPT(name) (snprintf(key, sizeof(key), "%s%s", prefix, name), tool_opts_get(o, key))
    co->key_secret = LUKS_OPT("key-secret");
    co->luks.cipher_alg = LUKS_OPT("cipher-alg");
    co->luks.cipher_mode = LUKS_OPT("cipher-mode");
    co->luks.ivgen_alg = LUKS_OPT("ivgen-alg");
    co->luks.ivgen_hash_alg = LUKS_OPT("ivgen-hash-alg");
    co->luks.hash_alg = LUKS_OPT("hash-alg");
    const char *v = LUKS_OPT("iter-time");
#undef LUKS_OPT
    if (v && opts_number(c, key, v, &co->luks.iter_time) < 0) {
        return -1;
    }
    if (v && co->luks.iter_time == 0 && co->key_secret) {
        /* qemu-img 7.2 divides by it (erratic results): refused (after its missing key check) */
        opts_error(c, OPTS_VALUE, "Parameter '%s' expects a positive number", key);
        return -1;
    }
    return 0;
}

/* qcow2's encryption=on / encrypt.*: only encrypt.format=luks (QEMU's legacy AES is refused). */
static int qcow2_encrypt_options(VdCreateOptions *co, const ToolOpts *o, const OptsCtx *c)
{
    const char *fmt = tool_opts_get(o, "encrypt.format");
    const char *legacy = tool_opts_get(o, "encryption");
    bool any = false;
    for (int i = 0; o && i < o->n; i++) {
        any |= !strncmp(o->v[i].key, "encrypt.", 8);
    }
    if ((legacy && strcmp(legacy, "off") != 0) || (fmt && !strcmp(fmt, "aes"))) {
        opts_error(c, OPTS_VALUE, "Legacy AES-CBC qcow2 encryption (encryption=on, "
                   "encrypt.format=aes) is not supported: use encrypt.format=luks");
        return -1;
    }
    if (fmt && strcmp(fmt, "luks") != 0) {
        /* QEMU names the member inside "encrypt" */
        opts_error(c, OPTS_VALUE, "Parameter 'format' does not accept value '%s'", fmt);
        return -1;
    }
    if (any && !fmt) {
        opts_error(c, OPTS_VALUE, "Parameter 'encrypt.format' is missing");
        return -1;
    }
    co->encrypt_format = fmt;
    return fmt ? luks_create_options(co, o, "encrypt.", c) : 0;
}

static int parse_bool_opt(const OptsCtx *c, const char *key, const char *v, bool *out)
{
    if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true")) {
        *out = true;
    } else if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false")) {
        *out = false;
    } else {
        opts_error(c, OPTS_SYNTAX, "Parameter '%s' expects 'on' or 'off'", key);
        return -1;
    }
    return 0;
}

int tool_create_options(CreateSpec *spec, const char *fmt, const ToolOpts *o, const char *filename,
                        ToolOptsUse use)
{
    VdCreateOptions *co = &spec->co;
    memset(spec, 0, sizeof(*spec));
    spec->o = o;
    co->format = fmt;
    OptsCtx ctx = { .fmt = fmt, .filename = filename ? filename : "", .use = use }, *c = &ctx;
    bool is_qcow2 = !strcmp(fmt, "qcow2"), is_luks = !strcmp(fmt, "luks");
    const char *const *names = is_qcow2 ? qcow2_opt_names
                             : is_luks ? luks_opt_names : raw_opt_names;
    for (int i = 0; o && i < o->n; i++) {
        bool known = false;
        for (int j = 0; names[j]; j++) {
            if (!strcmp(names[j], o->v[i].key)) {
                known = true;
            }
        }
        if (!known) {
            opts_error(c, OPTS_SYNTAX, "Invalid parameter '%s'", o->v[i].key);
            return -1;
        }
    }
    const char *v;
    int r;
    if ((v = tool_opts_get(o, "size"))) {
        if ((r = tool_parse_size(v, &co->size)) < 0) {
            opts_size_error(c, "size", v, r);
            return -1;
        }
        if (co->size > INT64_MAX) {
            opts_error(c, OPTS_VALUE, "Parameter 'size' expects a non-negative number below 2^63");
            return -1;
        }
        co->size_given = true;
    }
    co->backing_file = tool_opts_get(o, "backing_file");
    co->backing_fmt = tool_opts_get(o, "backing_fmt");
    if ((v = tool_opts_get(o, "cluster_size")) &&
        (r = tool_parse_size(v, &co->cluster_size)) < 0) {
        opts_size_error(c, "cluster_size", v, r);
        return -1;
    }
    if ((v = tool_opts_get(o, "lazy_refcounts")) &&
        parse_bool_opt(c, "lazy_refcounts", v, &co->lazy_refcounts) < 0) {
        return -1;
    }
    if ((v = tool_opts_get(o, "extended_l2")) &&
        parse_bool_opt(c, "extended_l2", v, &co->extended_l2) < 0) {
        return -1;
    }
    /* the file protocol's: qemu-img takes them with every format it creates on a file */
    if ((v = tool_opts_get(o, "nocow")) && parse_bool_opt(c, "nocow", v, &co->file.nocow) < 0) {
        return -1;
    }
    if ((v = tool_opts_get(o, "extent_size_hint"))) {
        if ((r = tool_parse_size(v, &co->file.extent_size_hint)) < 0) {
            opts_size_error(c, "extent_size_hint", v, r);
            return -1;
        }
        co->file.extent_size_hint_set = true;
    }
    co->data_file = tool_opts_get(o, "data_file");
    if ((v = tool_opts_get(o, "data_file_raw")) &&
        parse_bool_opt(c, "data_file_raw", v, &co->data_file_raw) < 0) {
        return -1;
    }
    const char *iter_key = is_luks ? "iter-time" : "encrypt.iter-time";
    uint64_t iter;
    if ((v = tool_opts_get(o, iter_key)) && opts_number(c, iter_key, v, &iter) < 0) {
        return -1;
    }
    uint64_t rb = 0;
    if ((v = tool_opts_get(o, "refcount_bits")) && opts_number(c, "refcount_bits", v, &rb) < 0) {
        return -1;
    }
    /* the format's own checks come after the list parsed, as qemu-img's */
    co->compat = tool_opts_get(o, "compat");
    if (co->compat && strcmp(co->compat, "0.10") && strcmp(co->compat, "v2") &&
        strcmp(co->compat, "1.1") && strcmp(co->compat, "v3")) {
        if (use == TOOL_OPTS_MEASURE) { /* qcow2_measure's own words */
            tool_error("Invalid compatibility level: '%s'", co->compat);
        } else {
            opts_error(c, OPTS_VALUE, "Parameter 'version' does not accept value '%s'", co->compat);
        }
        return -1;
    }
    if (v) {
        if (rb > 64) {
            opts_error(c, OPTS_VALUE, "Refcount width must be a power of two and may not "
                       "exceed 64 bits");
            return -1;
        }
        co->refcount_bits = (int)rb;
    }
    if ((v = tool_opts_get(o, "preallocation"))) {
        if (!strcmp(v, "off")) {
            co->prealloc = VD_PREALLOC_OFF;
        } else if (!strcmp(v, "metadata") && is_qcow2) {
            co->prealloc = VD_PREALLOC_METADATA;
        } else if (!strcmp(v, "falloc")) {
            co->prealloc = VD_PREALLOC_FALLOC;
        } else if (!strcmp(v, "full")) {
            co->prealloc = VD_PREALLOC_FULL;
        } else if (use == TOOL_OPTS_MEASURE) {
            tool_error("invalid parameter value: %s", v);
            return -1;
        } else {
            opts_error(c, OPTS_VALUE, "Parameter 'preallocation' does not accept value '%s'", v);
            return -1;
        }
    }
    co->compression_type = tool_opts_get(o, "compression_type");
    if (co->compression_type && strcmp(co->compression_type, "zlib") &&
        strcmp(co->compression_type, "zstd")) {
        opts_error(c, OPTS_VALUE, "Parameter 'compression-type' does not accept value '%s'",
                   co->compression_type);
        return -1;
    }
    if (is_luks) {
        return luks_create_options(co, o, "", c);
    }
    return is_qcow2 ? qcow2_encrypt_options(co, o, c) : 0;
}

/* " key=value" for each of names[] set in o (after prefix), in names' order. */
static void print_given(const ToolOpts *o, const char *prefix, const char *const *names)
{
    char key[64];
    for (int i = 0; names[i]; i++) {
        snprintf(key, sizeof(key), "%s%s", prefix, names[i]);
        const char *v = tool_opts_get(o, key);
        if (v && strcmp(names[i], "size") != 0 && strcmp(names[i], "preallocation") != 0 &&
            strcmp(names[i], "nocow") != 0 && strcmp(names[i], "extent_size_hint") != 0) {
            printf(" %s=%s", key, v);
        }
    }
}

void tool_print_formatting(const char *filename, const CreateSpec *spec)
{
    const VdCreateOptions *co = &spec->co;
    const ToolOpts *o = spec->o;
    const char *v;
    printf("Formatting '%s', fmt=%s", filename, co->format);
    if (!strcmp(co->format, "qcow2")) {
        if ((v = tool_opts_get(o, "encryption"))) {
            printf(" encryption=%s", v);
        }
        if ((v = tool_opts_get(o, "encrypt.format"))) {
            printf(" encrypt.format=%s", v);
        }
        print_given(o, "encrypt.", luks_opt_names);
        printf(" cluster_size=%" PRIu64, co->cluster_size ? co->cluster_size : 65536);
        v = tool_opts_get(o, "extended_l2");
        printf(" extended_l2=%s", v ? v : "off");
        if ((v = tool_opts_get(o, "preallocation"))) {
            printf(" preallocation=%s", v);
        }
        v = co->compression_type;
        printf(" compression_type=%s", v ? v : "zlib");
        printf(" size=%" PRIu64, co->size);
        if (co->compat) {
            printf(" compat=%s", co->compat);
        }
        if (co->backing_file) {
            printf(" backing_file=%s", co->backing_file);
        }
        if (co->backing_fmt) {
            printf(" backing_fmt=%s", co->backing_fmt);
        }
        if (co->data_file) {
            printf(" data_file=%s", co->data_file);
        }
        if ((v = tool_opts_get(o, "data_file_raw"))) {
            printf(" data_file_raw=%s", v);
        }
        v = tool_opts_get(o, "lazy_refcounts");
        printf(" lazy_refcounts=%s", v ? v : "off");
        printf(" refcount_bits=%d", co->refcount_bits ? co->refcount_bits : 16);
    } else {
        printf(" size=%" PRIu64, co->size);
        if (!strcmp(co->format, "luks")) {
            print_given(o, "", luks_opt_names);
        }
        /* then file-posix's own, in its order: nocow, preallocation, extent_size_hint */
        if ((v = tool_opts_get(o, "nocow"))) {
            printf(" nocow=%s", v);
        }
        if ((v = tool_opts_get(o, "preallocation"))) {
            printf(" preallocation=%s", v);
        }
    }
    if (!strcmp(co->format, "qcow2") && (v = tool_opts_get(o, "nocow"))) {
        printf(" nocow=%s", v); /* qcow2 has its own preallocation: file's two come last */
    }
    if (co->file.extent_size_hint_set) {
        printf(" extent_size_hint=%" PRIu64, co->file.extent_size_hint);
    }
    printf("\n");
    fflush(stdout);
}

typedef struct {
    const char *name, *help;
} CreateOptHelp;

/* qemu-img 7.2's create options (format level), sorted by name as it prints them. */
static const CreateOptHelp qcow2_help[] = {
    { "backing_file", "<str>     - File name of a base image" },
    { "backing_fmt", "<str>      - Image format of the base image" },
    { "cluster_size", "<size>    - qcow2 cluster size" },
    { "compat", "<str>           - Compatibility level (v2 [0.10] or v3 [1.1])" },
    { "compression_type", "<str> - Compression method used for image cluster compression" },
    { "data_file", "<str>        - File name of an external data file" },
    { "data_file_raw", "<bool (on/off)> - The external data file must stay valid as a raw image" },
    { "encrypt.cipher-alg", "<str> - Name of encryption cipher algorithm" },
    { "encrypt.cipher-mode", "<str> - Name of encryption cipher mode" },
    { "encrypt.format", "<str>   - Encrypt the image, format choices: 'aes', 'luks'" },
    { "encrypt.hash-alg", "<str> - Name of encryption hash algorithm" },
    { "encrypt.iter-time", "<num> - Time to spend in PBKDF in milliseconds" },
    { "encrypt.ivgen-alg", "<str> - Name of IV generator algorithm" },
    { "encrypt.ivgen-hash-alg", "<str> - Name of IV generator hash algorithm" },
    { "encrypt.key-secret", "<str> - ID of secret providing qcow AES key or LUKS passphrase" },
    { "encryption", "<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor "
                    "of encrypt.format=aes)" },
    { "extended_l2", "<bool (on/off)> - Extended L2 tables" },
    { "lazy_refcounts", "<bool (on/off)> - Postpone refcount updates" },
    { "preallocation", "<str>    - Preallocation mode (allowed values: off, metadata, falloc, "
                       "full)" },
    { "refcount_bits", "<num>    - Width of a reference count entry in bits" },
    { "size", "<size>            - Virtual disk size" },
    { NULL, NULL }
};
static const CreateOptHelp luks_help[] = {
    { "cipher-alg", "<str>       - Name of encryption cipher algorithm" },
    { "cipher-mode", "<str>      - Name of encryption cipher mode" },
    { "hash-alg", "<str>         - Name of encryption hash algorithm" },
    { "iter-time", "<num>        - Time to spend in PBKDF in milliseconds" },
    { "ivgen-alg", "<str>        - Name of IV generator algorithm" },
    { "ivgen-hash-alg", "<str>   - Name of IV generator hash algorithm" },
    { "key-secret", "<str>       - ID of the secret that provides the keyslot passphrase" },
    { "size", "<size>            - Virtual disk size" },
    { NULL, NULL }
};
static const CreateOptHelp raw_help[] = {
    { "size", "<size>            - Virtual disk size" },
    { NULL, NULL }
};
/* The file protocol's own (qemu-img adds them once a target filename is given). */
static const CreateOptHelp file_help[] = {
    { "extent_size_hint", "<size> - Extent size hint for the image file, 0 to disable" },
    { "nocow", "<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)" },
    { "preallocation", "<str>    - Preallocation mode (allowed values: off, falloc, full)" },
    { "size", "<size>            - Virtual disk size" },
    { NULL, NULL }
};

/*
 * qemu-img's "-o help": without a target filename the format's options and two closing lines;
 * with one, "Supported options:" and the format's and the protocol's merged by name.
 */
void tool_print_create_help(const char *fmt, const char *target)
{
    const CreateOptHelp *f = !strcmp(fmt, "qcow2") ? qcow2_help
                           : !strcmp(fmt, "luks") ? luks_help : raw_help;
    if (!target) {
        printf("Supported %s options:\n", fmt);
        for (; f->name; f++) {
            printf("  %s=%s\n", f->name, f->help);
        }
        printf("\nThe protocol level may support further options.\n"
               "Specify the target filename to include those options.\n");
        return;
    }
    printf("Supported options:\n");
    const CreateOptHelp *p = file_help;
    while (f->name || p->name) {
        int c = !f->name ? 1 : !p->name ? -1 : strcmp(f->name, p->name);
        const CreateOptHelp *e = c <= 0 ? f++ : p++;
        if (c == 0) {
            p++; /* both have it: qemu-img lists it once */
        }
        printf("  %s=%s\n", e->name, e->help);
    }
}

/* ---- dispatcher ---- */

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *usage;
} commands[] = {
    { "amend", img_amend,
      "amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename" },
    { "bench", img_bench,
      "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n]\n"
      "          [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size]\n"
      "          [-S step_size] [-t cache] [-w] [-U] filename" },
    { "bitmap", img_bitmap,
      "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n"
      "          [-b source_file [-F source_fmt]] [-g granularity] [-f fmt] filename bitmap" },
    { "check", img_check, "check [-q] [-f fmt] [--output=ofmt] [-r leaks|all] [-T src_cache] [-U] filename" },
    { "commit", img_commit,
      "commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename" },
    { "compare", img_compare,
      "compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2" },
    { "convert", img_convert,
      "convert [--bitmaps [--skip-broken-bitmaps]] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt]\n"
      "          [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]]\n"
      "          [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit]\n"
      "          [-m num_coroutines] [-W] [--salvage] [--target-is-zero]\n"
      "          filename [filename2 [...]] output_filename" },
    { "create", img_create,
      "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]" },
    { "dd", img_dd,
      "dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input "
      "of=output" },
    { "info", img_info,
      "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename" },
    { "io", img_io,
      "io [-f fmt] [-r] [-U] [-n] [-t cache] [-c 'command']... filename   (qemu-io style)" },
    { "map", img_map,
      "map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename" },
    { "measure", img_measure,
      "measure [--output=ofmt] [-O output_fmt] [-o options]\n"
      "          [--size N | [-f fmt] [-l snapshot_param] filename]" },
    { "rebase", img_rebase,
      "rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file "
      "[-F backing_fmt] filename" },
    { "resize", img_resize,
      "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size" },
    { "snapshot", img_snapshot,
      "snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename" },
    /* Online commands (virsh-like, over vdiskd's QMP socket): src/tools/virsh-*.c */
    { "blockcommit", virsh_blockcommit,
      "blockcommit DISK [--base B|--shallow] [--top T] [--active] [--pivot|--keep-overlay]\n"
      "          [--keep-relative|--absolute-backing] [--wait [--verbose] [--timeout S]\n"
      "          [--async]] [--bandwidth N [--bytes]] [--socket PATH]" },
    { "blockcopy", virsh_blockcopy,
      "blockcopy DISK DEST [--shallow] [--reuse-external [--backing-matches]] [--verify]\n"
      "          [--format F|--raw] [--wait] [--verbose] [--pivot|--finish] [--timeout S]\n"
      "          [--async] [--bandwidth N [--bytes]]\n"
      "          [--granularity N] [--buf-size N] [--synchronous-writes] [--node-name N]\n"
      "          [--base-node B] [--socket PATH]" },
    { "blockjob", virsh_blockjob,
      "blockjob DISK [--info [--raw|--verbose]|--abort [--async]|--pivot|--bandwidth N\n"
      "          [--bytes]|--resume] [--socket PATH]" },
    { "blockpull", virsh_blockpull,
      "blockpull DISK [--base B] [--keep-relative|--absolute-backing] [--wait [--verbose]\n"
      "          [--timeout S] [--async]] [--bandwidth N [--bytes]] [--socket PATH]" },
    { "domblklist", virsh_domblklist, "domblklist [--details] [--socket PATH]" },
    { "snapshot-create", virsh_snapshot_create,
      "snapshot-create DISK OVERLAY [--format F] [--reuse-external] [--absolute-backing]\n"
      "          [--node-name N] [--socket PATH]\n"
      "          (online commands: --socket defaults to $VDISK_SOCKET, else "
      "/run/vdisk/vdiskd.qmp)" },
};

void tool_print_usage(const char *cmd)
{
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (!strcmp(cmd, commands[i].name)) {
            printf("usage: " TOOL_NAME " %s\n", commands[i].usage);
            return;
        }
    }
    abort(); /* every command has its line in commands[] */
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* qemu-img's last help line: every format and protocol driver, sorted, from the registry. */
static void print_supported_formats(void)
{
    const char *names[64];
    size_t n = 0;
    const BlockDriver *d;
    for (size_t i = 0; n < sizeof(names) / sizeof(names[0]) && (d = vd_driver_at(i)); i++) {
        names[n++] = d->name;
    }
    qsort(names, n, sizeof(names[0]), cmp_names);
    printf("Supported formats:");
    for (size_t i = 0; i < n; i++) {
        printf(" %s", names[i]);
    }
    printf("\n");
}

static void print_help(void)
{
    printf("vdisk version " VDISK_VERSION "\n"
           "usage: " TOOL_NAME " [standard options] command [command options]\n"
           "QEMU-compatible disk image utility (qcow2, raw, LUKS)\n"
           "\n"
           "    '-h', '--help'       display this help and exit\n"
           "    '-V', '--version'    output version information and exit\n"
           "    '--image-opts'       (any command but create) the image operands are option\n"
           "                         lists as QEMU's: driver=qcow2,file.filename=a.qcow2\n"
           "    '--allow-probe'      allow probing the format of backing files that do not\n"
           "                         record one (unsafe: a raw backing file could pose as\n"
           "                         another format). The top image's format is probed when\n"
           "                         -f is not given.\n"
           "\n"
           "Command syntax:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        printf("  %s\n", commands[i].usage);
    }
    printf("\n"
           "Command parameters:\n"
           "  'size' is the disk image size in bytes. Optional suffixes 'k' or 'K' (1024),\n"
           "    'M', 'G', 'T', 'P' and 'E' are supported; 'b' is ignored.\n"
           "  'options' is a comma separated list of format specific options in a name=value\n"
           "    format. Use -o help for an overview of the options supported by the format.\n"
           "  '-c' (convert) writes compressed clusters (qcow2 only)\n"
           "  '-u' allows unsafe backing chains (create: do not open the backing file;\n"
           "       rebase: only rewrite the backing file name in the header)\n"
           "  '-p' show progress of command (only certain commands)\n"
           "  '-q' use Quiet mode - do not print any output (except errors)\n"
           "  '-U' open the image without taking locks (force share)\n"
           "\n"
           "Exit codes follow qemu-img: check exits 0 (clean), 1 (check failed), 2 (corruptions),\n"
           "3 (leaks only), 63 (format cannot be checked); compare exits 0 (identical),\n"
           "1 (different, or a usage error), 2 (cannot open), 3/4 (error while comparing);\n"
           "other commands exit 0 on success and 1 on failure.\n"
           "\n"
           "Notes (as in qemu-img): commit -b implies -d (the top image is not emptied);\n"
           "convert writes the target with cache=unsafe (no flushes) unless -t says otherwise;\n"
           "convert -B copies only what differs from the new backing file, so the output\n"
           "always reads like the source.\n"
           "\n"
           "'vdisk io' runs qemu-io style commands (read, write, discard, flush, map, length,\n"
           "info, alloc) given with -c, or one per line from stdin when no -c is given (then\n"
           "'flush' prints \"flushed\" and stdout is flushed after every command). Unlike\n"
           "qemu-io, a failed command (I/O error, pattern mismatch) makes the exit status 1.\n"
           "\n");
    print_supported_formats();
}

/* The commands where qemu-img (and qemu-io, for `io`) take --object. */
static bool takes_objects(const char *cmd)
{
    static const char *const names[] = {"amend", "bench", "bitmap", "check", "commit", "compare",
        "convert", "create", "dd", "info", "io", "map", "measure", "rebase", "resize",
        "snapshot", NULL};
    for (size_t i = 0; names[i]; i++) {
        if (!strcmp(cmd, names[i])) {
            return true;
        }
    }
    return false;
}

/* One --object argument: "secret,id=..." or "qom-type=secret,id=..." (the objects vdisk has). */
static int tool_object_add(const char *arg)
{
    VdError *err = NULL;
    const char *rest = NULL;
    if (!strncmp(arg, "secret,", 7)) {
        rest = arg + 7;
    } else if (!strncmp(arg, "qom-type=secret,", 16)) {
        rest = arg + 16;
    } else {
        size_t tl = strcspn(arg, ",");
        const char *type = !strncmp(arg, "qom-type=", 9) ? arg + 9 : arg;
        tool_error("Object type '%.*s' is not supported by vdisk (supported: secret)",
                   (int)(arg + tl - type), type);
        return -1;
    }
    if (vd_secret_add_keyval(rest, &err) < 0) {
        tool_report(err, NULL);
        return -1;
    }
    return 0;
}

/* Take every --object ARG / --object=ARG out of argv (before "--") and add the objects. */
static int take_objects(int *argc, char **argv)
{
    int w = 2;
    for (int i = 2; i < *argc; i++) {
        if (!strcmp(argv[i], "--")) {
            while (i < *argc) {
                argv[w++] = argv[i++];
            }
            break;
        }
        const char *val = NULL;
        if (!strcmp(argv[i], "--object")) {
            if (i + 1 >= *argc) {
                tool_error("missing argument for option '--object'");
                return -1;
            }
            val = argv[++i];
        } else if (!strncmp(argv[i], "--object=", 9)) {
            val = argv[i] + 9;
        }
        if (!val) {
            argv[w++] = argv[i];
        } else if (tool_object_add(val) < 0) {
            return -1;
        }
    }
    *argc = w;
    argv[w] = NULL;
    return 0;
}

int main(int argc, char **argv)
{
    /* --allow-probe is global: accept it anywhere before "--". */
    int w = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            for (; i < argc; i++) {
                argv[w++] = argv[i];
            }
            break;
        }
        if (!strcmp(argv[i], "--allow-probe")) {
            tool_allow_probe = true;
            continue;
        }
        /* every command that opens existing images takes it, as qemu-img's (not create) */
        if (!strcmp(argv[i], "--image-opts") && i > 1 && strcmp(argv[1], "create")) {
            tool_image_opts = true;
            continue;
        }
        argv[w++] = argv[i];
    }
    argc = w;
    argv[argc] = NULL;

    if (argc < 2) {
        tool_usage_error("Not enough arguments");
        return 1;
    }
    /* The options before the command, as qemu-img's ("+": stop at the command name) */
    static const struct option main_longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 }
    };
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "+:hV", main_longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            print_help();
            return 0;
        case 'V':
            printf("vdisk version " VDISK_VERSION "\n");
            return 0;
        default:
            tool_bad_option(NULL, c, argv[optind - 1]);
            return 1;
        }
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "help")) {
        print_help();
        return 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (!strcmp(cmd, commands[i].name)) {
            /* Commands see argv[0] = command name. */
            if (argc >= 3 && (!strcmp(argv[2], "-h") || !strcmp(argv[2], "--help"))) {
                tool_print_usage(cmd);
                return 0;
            }
            if (takes_objects(cmd) && take_objects(&argc, argv) < 0) {
                return 1;
            }
            optind = 0;
            opterr = 0;
            int ret = commands[i].fn(argc - 1, argv + 1);
            fflush(stdout);
            return ret;
        }
    }
    tool_usage_error("Command not found: %s", cmd);
    return 1;
}
