/*
 * img-create.c - commands that make or size images: create, resize, measure.
 * Option parsing and messages follow qemu-img 7.2; the format work is vd_create / vd_truncate /
 * the driver's measure callback.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/tool.h"

/* -o help (or -o ?) asks for the option list */
static bool opts_want_help(const ToolOpts *o)
{
    for (int i = 0; i < o->n; i++) {
        if (!strcmp(o->v[i].key, "help") || !strcmp(o->v[i].key, "?")) {
            return true;
        }
    }
    return false;
}

int img_create(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = "raw", *base = NULL, *base_fmt = NULL;
    char *optstr = NULL;
    bool unsafe = false, quiet = false;
    int c, ret = 1;
    ToolOpts o = { 0 };
    while ((c = getopt_long(argc, argv, ":F:b:f:ho:qu", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'b': base = optarg; break;
        case 'F': base_fmt = optarg; break;
        case 'u': unsafe = true; break;
        case 'q': quiet = true; break;
        case 'o':
            if (tool_append_opts(&optstr, optarg) < 0) {
                goto out;
            }
            break;
        case 'h': tool_print_usage("create");
            ret = 0; goto out;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); goto out;
        }
    }
    /* qemu-img's order: the option list's help, the operands, then the format (named after
     * the file, as bdrv_img_create's errors are) */
    if (optstr && tool_opts_parse(&o, optstr) < 0) {
        tool_error("out of memory");
        goto out;
    }
    if (opts_want_help(&o)) {
        if (tool_create_format(fmt, NULL, &o)) {
            tool_print_create_help(fmt, optind < argc ? argv[optind] : NULL);
            ret = 0;
        }
        goto out;
    }
    if (optind >= argc) {
        tool_usage_error("Expecting image file name");
        goto out;
    }
    const char *filename = argv[optind++];
    uint64_t img_size = 0;
    bool size_given = false;
    if (optind < argc) {
        if (tool_cvtnum("image size", argv[optind++], 0, INT64_MAX, &img_size) < 0) {
            goto out;
        }
        size_given = true;
    }
    if (optind != argc) {
        tool_usage_error("Unexpected argument: %s", argv[optind]);
        goto out;
    }
    const BlockDriver *drv = vd_find_driver(fmt);
    if (!drv || drv->is_protocol) {
        tool_error("%s: Unknown file format '%s'", filename, fmt);
        goto out;
    }

    CreateSpec spec;
    if (tool_create_options(&spec, fmt, &o, filename, TOOL_OPTS_CREATE) < 0) {
        goto out;
    }
    VdCreateOptions *co = &spec.co;
    if (base) {
        co->backing_file = base;
    }
    if (base_fmt) {
        co->backing_fmt = base_fmt;
    }
    if (size_given) {
        co->size = img_size;
        co->size_given = true;
    }
    co->unsafe = unsafe;
    if (co->backing_fmt && !co->backing_file) {
        tool_error("%s: Backing format cannot be used without backing file", filename);
        goto out;
    }
    if (co->backing_file) {
        if (!drv->supports_backing) {
            tool_error("%s: Backing file not supported for file format '%s'", filename, fmt);
            goto out;
        }
        if (!co->backing_fmt) {
            tool_error("%s: Backing file specified without backing format", filename);
            goto out;
        }
        if (!vd_find_driver(co->backing_fmt)) {
            tool_error("%s: Unknown backing file format '%s'", filename, co->backing_fmt);
            goto out;
        }
        if (!unsafe) {
            /* Open the backing file as the new image will (relative to its directory). */
            char *path = vd_resolve_backing_path(filename, co->backing_file);
            if (!path) {
                tool_error("out of memory");
                goto out;
            }
            VdError *err = NULL;
            BlockNode *bs = vd_open_image(path, co->backing_fmt,
                                          VD_OPEN_NO_BACKING | VD_OPEN_FORCE_SHARE, &err);
            free(path);
            if (!bs) {
                /* qemu-img's hint, on a line of its own */
                tool_error("%s: %s", filename, vd_error_msg(err));
                fputs("Could not open backing image.\n", stderr);
                vd_error_free(err);
                goto out;
            }
            if (!co->size_given) {
                int64_t len = vd_getlength(bs);
                if (len < 0) {
                    tool_error("%s: Could not get the size of the backing image: %s", filename,
                               strerror((int)-len));
                    vd_node_unref(bs);
                    goto out;
                }
                co->size = (uint64_t)len;
                co->size_given = true;
            }
            vd_node_unref(bs);
        }
    }
    if (!co->size_given) {
        tool_error("%s: Image creation needs a size parameter", filename);
        goto out;
    }
    if (!quiet) {
        tool_print_formatting(filename, &spec);
    }
    VdError *err = NULL;
    if (vd_create(co, filename, &err) < 0) {
        tool_report(err, filename);
        goto out;
    }
    ret = 0;
out:
    tool_opts_free(&o);
    free(optstr);
    return ret;
}

/* ---- resize ---- */

int img_resize(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "shrink", no_argument, NULL, OPT_SHRINK },
        { "preallocation", required_argument, NULL, OPT_PREALLOCATION },
        { "format", required_argument, NULL, 'f' },
        { NULL, 0, NULL, 0 }
    };
    /* The size may be negative: take it out before getopt sees "-1M" as an option. */
    if (argc < 3) {
        if (argc == 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
            tool_print_usage("resize");
            return 0;
        }
        tool_usage_error("Not enough arguments");
        return 1;
    }
    const char *size_arg = argv[--argc];
    argv[argc] = NULL;
    const char *fmt = NULL;
    bool quiet = false, shrink = false;
    VdPrealloc prealloc = VD_PREALLOC_OFF;
    int c;
    while ((c = getopt_long(argc, argv, ":f:hq", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'q': quiet = true; break;
        case OPT_SHRINK: shrink = true; break;
        case OPT_PREALLOCATION:
            if (!strcmp(optarg, "off")) {
                prealloc = VD_PREALLOC_OFF;
            } else if (!strcmp(optarg, "metadata")) {
                prealloc = VD_PREALLOC_METADATA;
            } else if (!strcmp(optarg, "falloc")) {
                prealloc = VD_PREALLOC_FALLOC;
            } else if (!strcmp(optarg, "full")) {
                prealloc = VD_PREALLOC_FULL;
            } else {
                tool_error("Invalid preallocation mode '%s'", optarg);
                return 1;
            }
            break;
        case 'h': tool_print_usage("resize"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    if (optind != argc - 1) {
        tool_usage_error("Expecting image file name and size");
        return 1;
    }
    const char *filename = argv[optind];
    int relative = 0;
    const char *p = size_arg;
    if (*p == '+') {
        relative = 1;
        p++;
    } else if (*p == '-') {
        relative = -1;
        p++;
    }
    uint64_t n;
    if (tool_parse_size(p, &n) < 0 || n > INT64_MAX) {
        tool_size_opt_error("", "size");
        return 1;
    }
    BlockNode *bs = tool_open(filename, fmt, VD_OPEN_RDWR);
    if (!bs) {
        return 1;
    }
    int ret = 1;
    int64_t cur = vd_getlength(bs);
    if (cur < 0) {
        tool_error("Could not get the image size: %s", strerror((int)-cur));
        goto out;
    }
    int64_t total;
    if (relative > 0) {
        total = cur + (int64_t)n;
        if (total < cur) {
            tool_error("New image size is too large");
            goto out;
        }
    } else if (relative < 0) {
        total = cur - (int64_t)n;
    } else {
        total = (int64_t)n;
    }
    if (total <= 0) {
        tool_error("New image size must be positive");
        goto out;
    }
    if (total < cur && !shrink) {
        tool_error("Use the --shrink option to perform a shrink operation.");
        goto out;
    }
    if (total < cur && prealloc != VD_PREALLOC_OFF) {
        tool_error("Preallocation can only be used for growing images");
        goto out;
    }
    VdError *err = NULL;
    if (vd_truncate(bs, (uint64_t)total, shrink, prealloc, &err) < 0) {
        tool_report(err, NULL);
        goto out;
    }
    int r = vd_flush(bs);
    if (r < 0) {
        tool_error("Could not flush the image: %s", strerror(-r));
        goto out;
    }
    if (!quiet) {
        printf("Image resized.\n");
    }
    ret = 0;
out:
    vd_node_unref(bs);
    return ret;
}

/* ---- measure ---- */

int img_measure(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "size", required_argument, NULL, OPT_SIZE },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *out_fmt = "raw", *output = NULL;
    char *optstr = NULL;
    uint64_t img_size = 0;
    bool size_given = false, force_share = false;
    int c, ret = 1;
    ToolOpts o = { 0 };
    ToolSnapParam snap = { 0 };
    BlockNode *src = NULL;
    while ((c = getopt_long(argc, argv, ":hf:O:o:l:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': out_fmt = optarg; break;
        case 'o':
            if (tool_append_opts(&optstr, optarg) < 0) {
                goto out;
            }
            break;
        case 'l':
            tool_opts_free(&snap.opts);
            if (tool_snapshot_param_parse(optarg, &snap) < 0) {
                goto out;
            }
            break;
        case 'U': force_share = true; break;
        case OPT_OUTPUT: /* checked here, as qemu-img's measure does */
            output = optarg;
            if (tool_parse_output(output) < 0) {
                goto out;
            }
            break;
        case OPT_SIZE:
            if (tool_cvtnum("image size", optarg, 0, INT64_MAX, &img_size) < 0) {
                goto out;
            }
            size_given = true;
            break;
        case 'h': tool_print_usage("measure");
            ret = 0; goto out;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); goto out;
        }
    }
    int json = tool_parse_output(output);
    if (json < 0) {
        goto out;
    }
    const char *filename = optind < argc ? argv[optind] : NULL;
    if (optind < argc - 1) {
        tool_error("At most one filename argument is allowed.");
        goto out;
    }
    if (!filename && (tool_image_opts || fmt || snap.given || snap.id_or_name)) {
        tool_error("--image-opts, -f, and -l require a filename argument.");
        goto out;
    }
    if (filename && size_given) {
        tool_error("--size N cannot be used together with a filename.");
        goto out;
    }
    if (!filename && !size_given) {
        tool_error("Either --size N or one filename must be specified.");
        goto out;
    }
    const BlockDriver *drv = tool_create_format(out_fmt, optstr, &o);
    if (!drv) {
        goto out;
    }
    if (opts_want_help(&o)) {
        tool_print_create_help(out_fmt, NULL);
        ret = 0;
        goto out;
    }
    if (!drv->measure) {
        tool_error("Format driver '%s' does not support size measurement", out_fmt);
        goto out;
    }
    CreateSpec spec;
    if (tool_create_options(&spec, out_fmt, &o, filename, TOOL_OPTS_MEASURE) < 0) {
        goto out;
    }
    if (filename) {
        src = tool_open_snapshot(filename, fmt, tool_open_flags(0, force_share), &snap);
        if (!src) {
            goto out;
        }
        int64_t len = vd_getlength(src);
        if (len < 0) {
            tool_error("Unable to get image virtual_size: %s", strerror((int)-len));
            goto out;
        }
        spec.co.size = (uint64_t)len;
    } else {
        spec.co.size = img_size;
    }
    spec.co.size_given = true;
    uint64_t required = 0, full = 0;
    VdError *err = NULL;
    if (drv->measure(&spec.co, src, &required, &full, &err) < 0) {
        tool_report(err, NULL);
        goto out;
    }
    /* qemu-img reports bitmap space for a qcow2 v3 target when the source can hold bitmaps. */
    bool v3 = !spec.co.compat || !strcmp(spec.co.compat, "1.1") || !strcmp(spec.co.compat, "v3");
    bool has_bitmaps = !strcmp(out_fmt, "qcow2") && v3 && src && !strcmp(src->drv->name, "qcow2");
    if (json) {
        json_t *obj = json_object();
        if (!obj) {
            tool_error("out of memory");
            goto out;
        }
        json_object_set_new(obj, "required", json_integer((json_int_t)required));
        json_object_set_new(obj, "fully-allocated", json_integer((json_int_t)full));
        if (has_bitmaps) {
            json_object_set_new(obj, "bitmaps", json_integer(0));
        }
        qjson_print(stdout, obj);
        json_decref(obj);
    } else {
        printf("required size: %" PRIu64 "\n", required);
        printf("fully allocated size: %" PRIu64 "\n", full);
        if (has_bitmaps) {
            printf("bitmaps size: 0\n");
        }
    }
    ret = 0;
out:
    if (src) {
        vd_node_unref(src);
    }
    tool_opts_free(&o);
    tool_opts_free(&snap.opts);
    free(optstr);
    return ret;
}
