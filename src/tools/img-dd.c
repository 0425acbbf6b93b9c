/*
 * img-dd.c - `vdisk dd`: copy part of an image into a new image, with qemu-img 7.2's operands
 * (bs, count, skip, if, of), options (-f, -O, -U) and its size rule: the output holds
 * min(count * bs, input size) - skip * bs bytes (count counts from the start of the input, not
 * from skip, as in qemu-img), read from skip * bs on. Every block is written, zeroes included.
 */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "tools/tool.h"

typedef struct DdArgs {
    uint64_t bs, count, skip;
    bool has_count, has_skip;
    const char *in, *out;
} DdArgs;

/* One "name=value" operand; 0 or -1 after the error is printed. */
static int dd_operand(DdArgs *a, const char *arg)
{
    const char *eq = strchr(arg, '=');
    size_t klen = eq ? (size_t)(eq - arg) : 0;
    const char *v = eq ? eq + 1 : "";
    if (klen == 2 && !strncmp(arg, "bs", 2)) {
        if (tool_cvtnum("bs", v, 1, INT32_MAX, &a->bs) < 0) {
            return -1;
        }
    } else if (klen == 5 && !strncmp(arg, "count", 5)) {
        if (tool_cvtnum("count", v, 0, INT64_MAX, &a->count) < 0) {
            return -1;
        }
        a->has_count = true;
    } else if (klen == 4 && !strncmp(arg, "skip", 4)) {
        if (tool_cvtnum("skip", v, 0, INT64_MAX, &a->skip) < 0) {
            return -1;
        }
        a->has_skip = true;
    } else if (klen == 2 && !strncmp(arg, "if", 2)) {
        a->in = v;
    } else if (klen == 2 && !strncmp(arg, "of", 2)) {
        a->out = v;
    } else {
        tool_error("unrecognized operand %.*s", eq ? (int)klen : (int)strlen(arg), arg);
        return -1;
    }
    return 0;
}

int img_dd(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *out_fmt = "raw";
    bool force_share = false;
    DdArgs a = { .bs = 512 };
    int c;
    while ((c = getopt_long(argc, argv, ":hf:O:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': out_fmt = optarg; break;
        case 'U': force_share = true; break;
        case 'h': tool_print_usage("dd"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    for (int i = optind; i < argc; i++) {
        if (dd_operand(&a, argv[i]) < 0) {
            return 1;
        }
    }
    if (!a.in || !a.out) {
        tool_error("Must specify both input and output files");
        return 1;
    }
    ToolOpts o = { 0 };
    const BlockDriver *drv = tool_create_format(out_fmt, NULL, &o);
    if (!drv) {
        return 1;
    }
    BlockNode *src = tool_open(a.in, fmt, tool_open_flags(0, force_share));
    if (!src) {
        return 1;
    }
    int ret = 1;
    BlockNode *dst = NULL;
    uint8_t *buf = NULL;
    int64_t len = vd_getlength(src);
    if (len < 0) {
        tool_error("Failed to get size for '%s'", a.in);
        goto out;
    }
    uint64_t size = (uint64_t)len;
    if (a.has_count && a.count <= INT64_MAX / a.bs && a.count * a.bs < size) {
        size = a.count * a.bs;
    }
    bool skip_past = a.has_skip && (a.skip > INT64_MAX / a.bs || size < a.bs * a.skip);
    uint64_t in_pos = skip_past ? size : a.skip * a.bs;
    uint64_t out_size = size - in_pos;
    CreateSpec spec;
    if (tool_create_options(&spec, out_fmt, &o, a.out, TOOL_OPTS_CREATE) < 0) {
        goto out;
    }
    spec.co.size = out_size;
    spec.co.size_given = true;
    VdError *err = NULL;
    if (vd_create(&spec.co, a.out, &err) < 0) {
        tool_error("%s: error while creating output image: %s", a.out, vd_error_msg(err));
        vd_error_free(err);
        goto out;
    }
    if (skip_past) {
        tool_error("%s: cannot skip to specified offset", a.in); /* qemu-img goes on: exit 0 */
    }
    dst = tool_open_plain(a.out, out_fmt, VD_OPEN_RDWR | VD_OPEN_NO_FLUSH);
    buf = malloc(a.bs);
    if (!dst || !buf) {
        if (dst) {
            tool_error("out of memory");
        }
        goto out;
    }
    for (uint64_t out_pos = 0; in_pos < size; ) {
        uint64_t n = size - in_pos < a.bs ? size - in_pos : a.bs;
        int r = vd_pread(src, in_pos, n, buf);
        if (r < 0) {
            tool_error("error while reading from input image file: %s", strerror(-r));
            goto out;
        }
        in_pos += n;
        r = vd_pwrite(dst, out_pos, n, buf, 0);
        if (r < 0) {
            tool_error("error while writing to output image file: %s", strerror(-r));
            goto out;
        }
        out_pos += n;
    }
    ret = vd_flush(dst) < 0 ? 1 : 0;
    if (ret) {
        tool_error("error while writing to output image file: could not flush");
    }
out:
    free(buf);
    tool_opts_free(&o);
    if (dst) {
        vd_node_unref(dst);
    }
    vd_node_unref(src);
    return ret;
}
