/*
 * img-snapshot.c - `vdisk snapshot`: list, create, apply and delete internal snapshots, with
 * qemu-img 7.2's options, messages and exit codes. The format work is the driver's
 * (vd_snapshot_*); -l opens read-only (and may share with -U), the others read-write.
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "tools/tool.h"

/* The id of the first snapshot named `name` (qemu-img's bdrv_snapshot_find), or NULL. */
static const char *find_by_name(json_t *snaps, const char *name)
{
    size_t i;
    json_t *sn;
    json_array_foreach(snaps, i, sn) {
        const char *n = json_string_value(json_object_get(sn, "name"));
        if (n && !strcmp(n, name)) {
            return json_string_value(json_object_get(sn, "id"));
        }
    }
    return NULL;
}

static void report(const char *what, const char *name, VdError *err)
{
    tool_error("Could not %s snapshot '%s': %s", what, name, vd_error_msg(err));
    vd_error_free(err);
}

int img_snapshot(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 }
    };
    char action = 0;
    const char *name = NULL;
    bool force_share = false;
    int c;
    while ((c = getopt_long(argc, argv, ":la:c:d:hqU", longopts, NULL)) != -1) {
        switch (c) {
        case 'l': case 'a': case 'c': case 'd':
            if (action) {
                tool_usage_error("Cannot mix '-l', '-a', '-c', '-d'");
                return 1;
            }
            action = (char)c;
            name = optarg;
            break;
        case 'q': break; /* nothing is printed but the list, which -q does not hide */
        case 'U': force_share = true; break;
        case 'h': tool_print_usage("snapshot"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    const char *filename = tool_one_image(argc, argv);
    if (!filename) {
        return 1;
    }
    if (force_share && action != 'l') {
        tool_error("Could not open '%s': force-share=on can only be used with read-only images",
                   filename);
        return 1;
    }
    int flags = action == 'l' ? 0 : VD_OPEN_RDWR;
    VdError *err = NULL;
    BlockNode *bs = tool_open(filename, NULL, tool_open_flags(flags, force_share));
    if (!bs) {
        return 1;
    }
    json_t *snaps = bs->drv->get_snapshots ? bs->drv->get_snapshots(bs) : NULL;
    int ret = 0;
    switch (action) {
    case 'l':
        if (snaps && json_array_size(snaps)) {
            tool_snapshot_dump(snaps);
        }
        break;
    case 'c':
        if (vd_snapshot_create(bs, name, &err) < 0) {
            int code = vd_error_code(err);
            vd_error_free(err);
            /* qemu-img prints the errno, not the driver's message */
            tool_error("Could not create snapshot '%s': %d (%s)", name, -code, strerror(code));
            ret = 1;
        }
        break;
    case 'a':
        if (vd_snapshot_goto(bs, name, &err) < 0) {
            report("apply", name, err);
            ret = 1;
        }
        break;
    case 'd': {
        const char *id = snaps ? find_by_name(snaps, name) : NULL;
        if (!id) {
            tool_error("Could not delete snapshot '%s': snapshot not found", name);
            ret = 1;
        } else if (vd_snapshot_delete(bs, id, name, &err) < 0) {
            report("delete", name, err);
            ret = 1;
        }
        break;
    }
    default:
        break; /* no action: qemu-img opens the image and does nothing */
    }
    json_decref(snaps);
    if (ret == 0 && action != 'l' && vd_flush(bs) < 0) {
        tool_error("Could not flush '%s'", filename);
        ret = 1;
    }
    vd_node_unref(bs);
    return ret;
}

/* ---- -l snapshot_param of convert and measure ---- */

int tool_snapshot_param_parse(const char *arg, ToolSnapParam *p)
{
    memset(p, 0, sizeof(*p));
    if (strncmp(arg, "snapshot.", 9) != 0) {
        p->id_or_name = arg;
        return 0;
    }
    if (tool_opts_parse(&p->opts, arg) < 0) {
        tool_error("Failed in parsing snapshot param '%s'", arg);
        return -1;
    }
    for (int i = 0; i < p->opts.n; i++) {
        const char *k = p->opts.v[i].key;
        if (strcmp(k, "snapshot.id") && strcmp(k, "snapshot.name")) {
            /* qemu-img prints these two on two lines */
            tool_error("Invalid parameter '%s'", k);
            tool_error("Failed in parsing snapshot param '%s'", arg);
            tool_opts_free(&p->opts);
            return -1;
        }
    }
    p->id = tool_opts_get(&p->opts, "snapshot.id");
    p->name = tool_opts_get(&p->opts, "snapshot.name");
    p->given = true;
    return 0;
}

/* The id of the snapshot the parameter selects (QEMU's find_snapshot_by_id_and_name). */
static const char *snapshot_param_find(json_t *snaps, const ToolSnapParam *p)
{
    size_t i;
    json_t *sn;
    if (p->id_or_name) {
        json_array_foreach(snaps, i, sn) {
            const char *id = json_string_value(json_object_get(sn, "id"));
            if (id && !strcmp(id, p->id_or_name)) {
                return id;
            }
        }
        return find_by_name(snaps, p->id_or_name);
    }
    if (!p->id && !p->name) {
        return NULL;
    }
    json_array_foreach(snaps, i, sn) {
        const char *id = json_string_value(json_object_get(sn, "id"));
        const char *name = json_string_value(json_object_get(sn, "name"));
        if (id && name && (!p->id || !strcmp(p->id, id)) && (!p->name || !strcmp(p->name, name))) {
            return id;
        }
    }
    return NULL;
}

BlockNode *tool_open_snapshot(const char *filename, const char *fmt, int flags,
                              const ToolSnapParam *p)
{
    BlockNode *bs = tool_open(filename, fmt, flags & ~VD_OPEN_RDWR);
    if (!bs || (!p->given && !p->id_or_name)) {
        return bs;
    }
    if (!bs->drv->get_snapshots) {
        tool_error("Failed to load snapshot: Block format '%s' used by device '' does not "
                   "support temporarily loading internal snapshots", bs->drv->name);
        vd_node_unref(bs);
        return NULL;
    }
    json_t *snaps = bs->drv->get_snapshots(bs);
    const char *id = snaps ? snapshot_param_find(snaps, p) : NULL;
    char *id_copy = id ? strdup(id) : NULL;
    json_decref(snaps);
    char *drv_name = strdup(bs->drv->name);
    vd_node_unref(bs);
    if (!id || !id_copy || !drv_name) {
        tool_error(id && (!id_copy || !drv_name) ? "out of memory"
                                                  : "Failed to load snapshot: Can't find snapshot");
        free(id_copy);
        free(drv_name);
        return NULL;
    }
    /* The id is unique in the table, and the driver matches ids first: this is the one found. */
    VdOpenOptions o = { .filename = filename, .format = drv_name,
                        .flags = tool_open_flags(flags & ~VD_OPEN_RDWR, false),
                        .snapshot = id_copy };
    VdError *err = NULL;
    bs = vd_open(&o, &err);
    if (!bs) {
        tool_report(err, "Failed to load snapshot");
    }
    free(id_copy);
    free(drv_name);
    return bs;
}
