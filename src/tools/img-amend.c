/*
 * img-amend.c - `vdisk amend`: change an existing image's format options in place (qemu-img 7.2's
 * options, refusals, messages and exit codes). The tool checks the -o list against what amend can
 * change; the format does the work (vd_amend), and `size` is a plain resize after it.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/tool.h"

/* qcow2's amend options as `-o help` lists them (qemu-img 7.2's order and words). */
static const struct {
    const char *name, *help;
} qcow2_amend_opts[] = {
    { "backing_file", "<str>     - File name of a base image" },
    { "backing_fmt", "<str>      - Image format of the base image" },
    { "compat", "<str>           - Compatibility level (v2 [0.10] or v3 [1.1])" },
    { "data_file", "<str>        - File name of an external data file" },
    { "data_file_raw", "<bool (on/off)> - The external data file must stay valid as a raw image" },
    { "encrypt.iter-time", "<num> - Time to spend in PBKDF in milliseconds" },
    { "encrypt.keyslot", "<num>  - Select a single keyslot to modify explicitly" },
    { "encrypt.new-secret",
      "<str> - New secret to set in the matching keyslots. Empty string to erase" },
    { "encrypt.old-secret", "<str> - Select all keyslots that match this password" },
    { "encrypt.state", "<str>    - Select new state of affected keyslots (active/inactive)" },
    { "lazy_refcounts", "<bool (on/off)> - Postpone refcount updates" },
    { "refcount_bits", "<num>    - Width of a reference count entry in bits" },
    { "size", "<size>            - Virtual disk size" },
};
#define N_AMEND_OPTS (sizeof(qcow2_amend_opts) / sizeof(qcow2_amend_opts[0]))

/* qcow2 options that only create takes (qemu-img names them "only supported for image creation"). */
static const char *const qcow2_create_only[] = {
    "cluster_size", "compression_type", "extended_l2", "preallocation", "encryption",
    "encrypt.format", "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.hash-alg",
    "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.key-secret", NULL
};

static bool is_amend_opt(const char *key)
{
    for (size_t i = 0; i < N_AMEND_OPTS; i++) {
        if (!strcmp(qcow2_amend_opts[i].name, key)) {
            return true;
        }
    }
    return false;
}

/* Print the amend options of fmt; 0, or 1 after qemu-img's refusal for formats without amend. */
static int print_amend_help(const char *fmt)
{
    const BlockDriver *drv = vd_find_driver(fmt);
    if (!drv || drv->is_protocol) {
        tool_error("Unknown file format '%s'", fmt);
        return 1;
    }
    if (!drv->amend) {
        tool_error("Format driver '%s' does not support option amendment", fmt);
        return 1;
    }
    printf("Amend options for '%s':\n", fmt);
    for (size_t i = 0; i < N_AMEND_OPTS; i++) {
        printf("  %s=%s\n", qcow2_amend_opts[i].name, qcow2_amend_opts[i].help);
    }
    return 0;
}

static int parse_on_off(const char *key, const char *v)
{
    if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true")) {
        return 1;
    }
    if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false")) {
        return 0;
    }
    tool_error("Parameter '%s' expects 'on' or 'off'", key);
    return -1;
}

/*
 * Check the -o list and fill *ao (+ *size when size= is given). Refusals in qemu-img's words and
 * order: unknown and create-only names first, then each value, then what amend cannot change.
 */
static int amend_parse(const ToolOpts *o, VdAmendOptions *ao, uint64_t *size, bool *size_given)
{
    for (int i = 0; i < o->n; i++) {
        const char *key = o->v[i].key;
        if (is_amend_opt(key)) {
            continue;
        }
        tool_error("Invalid parameter '%s'", key);
        for (int j = 0; qcow2_create_only[j]; j++) {
            if (!strcmp(qcow2_create_only[j], key)) {
                fprintf(stderr, "This option is only supported for image creation\n");
            }
        }
        return -1;
    }
    const char *v;
    if ((v = tool_opts_get(o, "size"))) {
        if (tool_parse_size(v, size) < 0 || *size > INT64_MAX) {
            tool_error("Parameter 'size' expects a non-negative number below 2^63");
            return -1;
        }
        *size_given = true;
    }
    if ((v = tool_opts_get(o, "lazy_refcounts")) &&
        (ao->lazy_refcounts = parse_on_off("lazy_refcounts", v)) < 0) {
        return -1;
    }
    if ((v = tool_opts_get(o, "data_file_raw")) &&
        (ao->data_file_raw = parse_on_off("data_file_raw", v)) < 0) {
        return -1;
    }
    ao->data_file = tool_opts_get(o, "data_file");
    if ((v = tool_opts_get(o, "refcount_bits"))) {
        uint64_t rb;
        if (tool_parse_uint(v, &rb) < 0 || rb == 0 || rb > 64 || (rb & (rb - 1))) {
            tool_error("Refcount width must be a power of two and may not exceed 64 bits");
            return -1;
        }
        ao->refcount_bits = (int)rb;
    }
    if ((v = tool_opts_get(o, "compat"))) {
        if (strcmp(v, "0.10") && strcmp(v, "v2") && strcmp(v, "1.1") && strcmp(v, "v3")) {
            tool_error("Unknown compatibility level %s", v);
            return -1;
        }
        ao->compat = v;
    }
    if (tool_opts_get(o, "backing_file") || tool_opts_get(o, "backing_fmt")) {
        tool_error("Cannot amend the backing file");
        fprintf(stderr, "You can use 'qemu-img rebase' instead.\n");
        return -1;
    }
    for (int i = 0; i < o->n; i++) {
        if (!strncmp(o->v[i].key, "encrypt.", 8)) {
            tool_error("Can't amend encryption options - encryption not present");
            return -1;
        }
    }
    return 0;
}

static void amend_progress(void *opaque, uint64_t done, uint64_t total)
{
    (void)opaque;
    progress_print(total ? 100.0f * (float)done / (float)total : 100.0f, 0);
}

int img_amend(int argc, char **argv)
{
    enum { OPT_FORCE = OPT_OBJECT + 1 };
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force", no_argument, NULL, OPT_FORCE },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *cache = "writeback";
    char *optstr = NULL;
    bool progress = false, quiet = false;
    int c, ret = 1;
    ToolOpts o = { 0 };
    BlockNode *bs = NULL;
    VdAmendOptions ao = { .lazy_refcounts = -1, .data_file_raw = -1, .progress = amend_progress };
    uint64_t size = 0;
    bool size_given = false;
    VdError *err = NULL;
    while ((c = getopt_long(argc, argv, ":ho:f:t:pq", longopts, NULL)) != -1) {
        switch (c) {
        case 'o':
            if (tool_append_opts(&optstr, optarg) < 0) {
                goto out;
            }
            break;
        case 'f': fmt = optarg; break;
        case 't': cache = optarg; break;
        case 'p': progress = true; break;
        case 'q': quiet = true; break;
        case OPT_FORCE: break; /* only meaningful for encryption keyslots */
        case 'h': tool_print_usage("amend"); ret = 0; goto out;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); goto out;
        }
    }
    if (!optstr) {
        tool_usage_error("Must specify options (-o)");
        goto out;
    }
    if (tool_opts_parse(&o, optstr) < 0) {
        tool_error("out of memory");
        goto out;
    }
    bool help = tool_opts_get(&o, "help") || tool_opts_get(&o, "?");
    const char *filename = optind == argc - 1 ? argv[optind] : NULL;
    if (help && fmt) { /* with or without a file name, as qemu-img */
        ret = print_amend_help(fmt);
        goto out;
    }
    if (!filename) { /* qemu-img's amend says it without the usage hint */
        tool_error("Expecting one image file name");
        goto out;
    }
    int flags;
    if (tool_cache_flags(cache, &flags) < 0) {
        tool_error("Invalid cache option: %s", cache);
        goto out;
    }
    bs = tool_open(filename, fmt, flags | VD_OPEN_RDWR);
    if (!bs) {
        goto out;
    }
    if (help) {
        ret = print_amend_help(bs->drv->name);
        goto out;
    }
    if (!bs->drv->amend) {
        tool_error("Format driver '%s' does not support option amendment", bs->drv->name);
        goto out;
    }
    if (amend_parse(&o, &ao, &size, &size_given) < 0) {
        goto out;
    }
    progress_init(progress && !quiet, 1.0f);
    progress_print(0, 0);
    int r = vd_amend(bs, &ao, &err);
    if (r == 0 && size_given) {
        r = vd_truncate(bs, size, true, VD_PREALLOC_OFF, &err);
    }
    /* qemu-img shows 100 % and ends the line before it reports a failure */
    progress_print(100, 0);
    progress_end();
    if (r < 0) {
        tool_report(err, NULL);
        goto out;
    }
    if (vd_flush(bs) < 0) {
        tool_error("Error while amending options: could not flush '%s'", filename);
        goto out;
    }
    ret = 0;
out:
    vd_node_unref(bs);
    tool_opts_free(&o);
    free(optstr);
    return ret;
}
