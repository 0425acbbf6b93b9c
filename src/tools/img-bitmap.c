/*
 * img-bitmap.c - `vdisk bitmap`: add, remove, clear, enable, disable and merge persistent dirty
 * bitmaps of an image offline, with qemu-img 7.2's options, messages and exit codes. The actions
 * run in command-line order through the same operations as QMP's block-dirty-bitmap-* (the
 * dirty-bitmap module); the image is opened read-write without its backing chain, a merge
 * source file (-b) read-only. The first failing action stops the rest; what ran before it stays.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "block/dirty-bitmap.h"
#include "tools/tool.h"

enum {
    OPT_ADD = OPT_OBJECT + 1,
    OPT_REMOVE,
    OPT_CLEAR,
    OPT_ENABLE,
    OPT_DISABLE,
    OPT_MERGE,
};

typedef struct BitmapAction {
    int act;          /* OPT_ADD ... OPT_MERGE */
    const char *src;  /* --merge SOURCE */
} BitmapAction;

/* One action on bitmap `name` of bs; the merge source lives on src_bs. */
static int run_action(const BitmapAction *a, BlockNode *bs, BlockNode *src_bs, const char *name,
                      uint64_t granularity, VdError **errp)
{
    switch (a->act) {
    case OPT_ADD:
        return vd_bitmap_add(bs, name, granularity, true, false, errp);
    case OPT_REMOVE:
        return vd_bitmap_remove(bs, name, errp);
    case OPT_CLEAR:
        return vd_bitmap_clear(bs, name, errp);
    case OPT_ENABLE:
    case OPT_DISABLE:
        return vd_bitmap_enable(bs, name, a->act == OPT_ENABLE, errp);
    default: {
        VdBitmapRef ref = { .node = src_bs, .name = a->src };
        return vd_bitmap_merge(bs, name, &ref, 1, errp);
    }
    }
}

static const char *action_name(int act)
{
    static const char *const names[] = { "add", "remove", "clear", "enable", "disable", "merge" };
    return names[act - OPT_ADD];
}

int img_bitmap(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "add", no_argument, NULL, OPT_ADD },
        { "remove", no_argument, NULL, OPT_REMOVE },
        { "clear", no_argument, NULL, OPT_CLEAR },
        { "enable", no_argument, NULL, OPT_ENABLE },
        { "disable", no_argument, NULL, OPT_DISABLE },
        { "merge", required_argument, NULL, OPT_MERGE },
        { "granularity", required_argument, NULL, 'g' },
        { "source-file", required_argument, NULL, 'b' },
        { "source-format", required_argument, NULL, 'F' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *src_filename = NULL, *src_fmt = NULL;
    uint64_t granularity = 0;
    bool add = false, merge = false;
    BitmapAction *acts = calloc((size_t)argc, sizeof(*acts)); /* at most one per argument */
    size_t nacts = 0;
    int ret = 1, c;
    if (!acts) {
        tool_error("Out of memory");
        return 1;
    }
    while ((c = getopt_long(argc, argv, ":b:hg:F:f:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h': tool_print_usage("bitmap"); free(acts); return 0;
        case 'b': src_filename = optarg; break;
        case 'F': src_fmt = optarg; break;
        case 'f': fmt = optarg; break;
        case 'g':
            if (tool_cvtnum("granularity", optarg, 0, INT64_MAX, &granularity) < 0) {
                goto out;
            }
            break;
        case OPT_ADD: case OPT_REMOVE: case OPT_CLEAR: case OPT_ENABLE: case OPT_DISABLE:
        case OPT_MERGE:
            acts[nacts].act = c;
            acts[nacts++].src = c == OPT_MERGE ? optarg : NULL;
            add |= c == OPT_ADD;
            merge |= c == OPT_MERGE;
            break;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); goto out;
        }
    }
    /* qemu-img's checks, in its order */
    if (nacts == 0) {
        tool_error("Need at least one of --add, --remove, --clear, --enable, --disable, or "
                   "--merge");
        goto out;
    }
    if (granularity && !add) {
        tool_error("granularity only supported with --add");
        goto out;
    }
    if (src_fmt && !src_filename) {
        tool_error("-F only supported with -b");
        goto out;
    }
    if (src_filename && !merge) {
        tool_error("Merge bitmap source file only supported with --merge");
        goto out;
    }
    if (optind != argc - 2) {
        tool_error("Expecting filename and bitmap name");
        goto out;
    }
    const char *filename = argv[optind], *name = argv[optind + 1];
    /* bitmaps belong to this image alone: its backing chain is not needed */
    BlockNode *bs = tool_open(filename, fmt, VD_OPEN_RDWR | VD_OPEN_NO_BACKING);
    BlockNode *src = NULL;
    if (bs && src_filename) {
        src = tool_open(src_filename, src_fmt, VD_OPEN_NO_BACKING);
    }
    if (bs && (src || !src_filename)) {
        VdError *err = NULL;
        size_t i;
        for (i = 0; i < nacts; i++) {
            if (run_action(&acts[i], bs, src ? src : bs, name, granularity, &err) < 0) {
                tool_error("Operation %s on bitmap %s failed: %s", action_name(acts[i].act),
                           name, vd_error_msg(err));
                vd_error_free(err);
                break;
            }
        }
        ret = i == nacts ? 0 : 1;
        /* store now rather than only at close, where a failure could not reach the exit code */
        if (vd_bitmaps_store(bs, &err) < 0) {
            tool_report(err, "Could not store the bitmaps");
            ret = 1;
        }
    }
    vd_node_unref(src);
    vd_node_unref(bs);
out:
    free(acts);
    return ret;
}
