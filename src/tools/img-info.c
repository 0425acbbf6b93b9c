/*
 * img-info.c - read-only inspection commands: info, map, check (check -r repairs).
 * Output mirrors qemu-img 7.2 byte for byte where the library reports the same facts; images
 * are never opened read-write except by `check -r`.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tools/tool.h"

/* ---- info ---- */

static const char *jstr(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static bool jint(json_t *o, const char *k, int64_t *out)
{
    json_t *v = json_object_get(o, k);
    if (!json_is_integer(v)) {
        return false;
    }
    *out = json_integer_value(v);
    return true;
}

/*
 * qemu-img's "Snapshot list:" table (QEMU's bdrv_snapshot_dump): fixed-width columns that long
 * names simply push right, the date in local time, VM CLOCK as hh:mm:ss.mmm, ICOUNT blank when
 * the snapshot has none.
 */
void tool_snapshot_dump(json_t *snaps)
{
    printf("Snapshot list:\n");
    printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    size_t i;
    json_t *sn;
    json_array_foreach(snaps, i, sn) {
        int64_t vmsize = 0, dsec = 0, csec = 0, cnsec = 0, icount;
        jint(sn, "vm-state-size", &vmsize);
        jint(sn, "date-sec", &dsec);
        jint(sn, "vm-clock-sec", &csec);
        jint(sn, "vm-clock-nsec", &cnsec);
        char size[64], date[64] = "", clock[128], ic[64] = "";
        tool_size_to_str((uint64_t)vmsize, size, sizeof(size));
        time_t t = (time_t)dsec;
        struct tm tm;
        if (localtime_r(&t, &tm)) {
            strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
        }
        uint64_t ns = (uint64_t)csec * 1000000000ull + (uint64_t)cnsec;
        uint64_t secs = ns / 1000000000ull;
        snprintf(clock, sizeof(clock), "%02d:%02d:%02d.%03d", (int)(secs / 3600),
                 (int)((secs / 60) % 60), (int)(secs % 60), (int)((ns / 1000000) % 1000));
        if (jint(sn, "icount", &icount)) {
            snprintf(ic, sizeof(ic), "%" PRId64, icount);
        }
        const char *id = jstr(sn, "id"), *name = jstr(sn, "name");
        printf("%-9s %-16s %8s%20s%13s%11s\n", id ? id : "", name ? name : "", size, date, clock,
               ic);
    }
}

static void info_dump_human(json_t *info)
{
    char sbuf[64], dbuf[64];
    int64_t vsize = 0, asize = -1, csize;
    jint(info, "virtual-size", &vsize);
    tool_size_to_str((uint64_t)vsize, sbuf, sizeof(sbuf));
    if (jint(info, "actual-size", &asize) && asize >= 0) {
        tool_size_to_str((uint64_t)asize, dbuf, sizeof(dbuf));
    } else {
        snprintf(dbuf, sizeof(dbuf), "unavailable");
    }
    const char *fn = jstr(info, "filename");
    const char *fmt = jstr(info, "format");
    printf("image: %s\n"
           "file format: %s\n"
           "virtual size: %s (%" PRId64 " bytes)\n"
           "disk size: %s\n",
           fn ? fn : "", fmt ? fmt : "", sbuf, vsize, dbuf);
    if (json_is_true(json_object_get(info, "encrypted"))) {
        printf("encrypted: yes\n");
    }
    if (jint(info, "cluster-size", &csize)) {
        printf("cluster_size: %" PRId64 "\n", csize);
    }
    if (json_is_true(json_object_get(info, "dirty-flag"))) {
        printf("cleanly shut down: no\n");
    }
    const char *bf = jstr(info, "backing-filename");
    if (bf) {
        const char *full = jstr(info, "full-backing-filename");
        printf("backing file: %s", bf);
        if (!full) {
            printf(" (cannot determine actual path)");
        } else if (strcmp(bf, full)) {
            printf(" (actual path: %s)", full);
        }
        printf("\n");
        const char *bff = jstr(info, "backing-filename-format");
        if (bff) {
            printf("backing file format: %s\n", bff);
        }
    }
    json_t *snaps = json_object_get(info, "snapshots");
    if (json_is_array(snaps)) {
        tool_snapshot_dump(snaps);
    }
    json_t *spec = json_object_get(info, "format-specific");
    if (json_is_object(spec)) {
        json_t *data = json_object_get(spec, "data");
        printf("Format specific information:\n");
        if (json_is_object(data)) {
            qdict_dump_human(stdout, data, 1);
        }
    }
}

/* The image operand and the --output choice (*json: 0 human, 1 json); NULL when either is bad. */
static const char *image_and_output(int argc, char **argv, const char *output, int *json)
{
    const char *filename = tool_one_image(argc, argv);
    if (!filename) {
        return NULL;
    }
    *json = tool_parse_output(output);
    return *json < 0 ? NULL : filename;
}

int img_info(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "backing-chain", no_argument, NULL, OPT_BACKING_CHAIN },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *output = NULL;
    bool chain = false, force_share = false;
    int c;
    while ((c = getopt_long(argc, argv, ":hf:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case OPT_OUTPUT: output = optarg; break;
        case OPT_BACKING_CHAIN: chain = true; break;
        case 'U': force_share = true; break;
        case 'h': tool_print_usage("info"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    int json;
    const char *filename = image_and_output(argc, argv, output, &json);
    if (!filename) {
        return 1;
    }
    /*
     * One image at a time, each without its backing file, as qemu-img's collect_image_info_list:
     * backing.* options are refused, a backing file that cannot be opened is named itself.
     */
    int flags = tool_open_flags(VD_OPEN_NO_IO | VD_OPEN_NO_BACKING, force_share);
    BlockNode *top = tool_open(filename, fmt, flags);
    if (!top) {
        return 1;
    }
    json_t *list = json_array();
    int ret = 0;
    BlockNode *bs = top;
    for (int depth = 0; list; depth++) {
        VdError *err = NULL;
        json_t *info = vd_image_info(bs, &err);
        if (!info) {
            tool_report(err, bs->filename);
            ret = 1;
            break;
        }
        json_array_append_new(list, info);
        if (!chain || !bs->backing_file || !*bs->backing_file) {
            break;
        }
        const char *next = bs->full_backing_filename;
        bool loop = depth >= 1000; /* as the block layer's deepest chain */
        size_t i;
        json_t *seen;
        json_array_foreach(list, i, seen) {
            loop = loop || !strcmp(json_string_value(json_object_get(seen, "filename")), next);
        }
        if (loop) {
            tool_error("Backing file '%s' creates an infinite loop.", next);
            ret = 1;
            break;
        }
        if (vd_backing_format_check(bs, flags, &err) < 0) {
            tool_error("Could not open '%s': %s", filename, vd_error_msg(err));
            vd_error_free(err);
            ret = 1;
            break;
        }
        BlockNode *b = tool_open_plain(next, bs->backing_format, flags);
        if (bs != top) {
            vd_node_unref(bs);
        }
        bs = b;
        if (!bs) {
            ret = 1;
            break;
        }
    }
    if (bs && bs != top) {
        vd_node_unref(bs);
    }
    if (!list) {
        tool_error("out of memory");
        ret = 1;
    }
    if (!ret) {
        if (json) {
            qjson_print(stdout, chain ? list : json_array_get(list, 0));
        } else {
            size_t i;
            json_t *info;
            json_array_foreach(list, i, info) {
                if (i) {
                    printf("\n");
                }
                info_dump_human(info);
            }
        }
    }
    json_decref(list);
    vd_node_unref(top);
    return ret;
}

/* ---- map ---- */

typedef struct MapEntry {
    uint64_t start, length, offset;
    int depth;
    bool data, zero, present, has_offset;
    const char *filename;
} MapEntry;

/* Mirrors qemu-img's get_block_status(): walk down until a layer decides (DATA or ZERO). */
static int map_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, MapEntry *e)
{
    int depth = 0;
    VdBlockStatus st;
    uint64_t pnum = 0;
    int flags;
    for (;;) {
        memset(&st, 0, sizeof(st));
        int ret = vd_block_status(bs, offset, bytes, &pnum, &st);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0 || pnum > bytes) {
            return -EIO; /* a library bug must not turn into an endless loop */
        }
        bytes = pnum;
        flags = st.flags;
        if (flags & (VD_BS_ZERO | VD_BS_DATA)) {
            break;
        }
        bs = bs->backing;
        if (!bs) {
            flags = 0;
            break;
        }
        depth++;
    }
    *e = (MapEntry){
        .start = offset,
        .length = bytes,
        .data = !!(flags & VD_BS_DATA),
        .zero = !!(flags & VD_BS_ZERO),
        .offset = st.offset,
        .has_offset = !!(flags & VD_BS_OFFSET_VALID),
        .depth = depth,
        .present = !!(flags & VD_BS_ALLOCATED),
        .filename = (flags & VD_BS_OFFSET_VALID) && st.file ? st.file->filename : NULL,
    };
    if (!e->has_offset) {
        e->offset = 0;
    }
    return 0;
}

static bool map_mergeable(const MapEntry *a, const MapEntry *b)
{
    if (a->length == 0) {
        return false;
    }
    if (a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
        a->present != b->present || !a->filename != !b->filename ||
        a->has_offset != b->has_offset) {
        return false;
    }
    if (a->filename && strcmp(a->filename, b->filename)) {
        return false;
    }
    if (a->has_offset && a->offset + a->length != b->offset) {
        return false;
    }
    return true;
}

static int map_dump(int json, const MapEntry *e, MapEntry *next)
{
    if (json) {
        printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d,"
               " \"present\": %s, \"zero\": %s, \"data\": %s",
               e->start, e->length, e->depth, e->present ? "true" : "false",
               e->zero ? "true" : "false", e->data ? "true" : "false");
        if (e->has_offset) {
            printf(", \"offset\": %" PRIu64, e->offset);
        }
        putchar('}');
        if (next) {
            puts(",");
        }
        return 0;
    }
    if (e->data && !e->has_offset) {
        tool_error("File contains external, encrypted or compressed clusters.");
        return -1;
    }
    if (e->data && !e->zero) {
        printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
               e->has_offset ? e->offset : 0, e->filename ? e->filename : "");
    }
    /* Human output ignores the difference between hole, zero and zero+data: merge more. */
    if (next && (!next->data || next->zero)) {
        next->data = false;
        next->zero = true;
    }
    return 0;
}

int img_map(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "force-share", no_argument, NULL, 'U' },
        { "start-offset", required_argument, NULL, 's' },
        { "max-length", required_argument, NULL, 'l' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *output = NULL;
    bool force_share = false;
    uint64_t start = 0, max_length = UINT64_MAX;
    int c;
    while ((c = getopt_long(argc, argv, ":hf:s:l:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case OPT_OUTPUT: output = optarg; break;
        case 'U': force_share = true; break;
        case 's':
            if (tool_cvtnum("start offset", optarg, 0, INT64_MAX, &start) < 0) {
                return 1;
            }
            break;
        case 'l':
            if (tool_cvtnum("max length", optarg, 0, INT64_MAX, &max_length) < 0) {
                return 1;
            }
            break;
        case 'h': tool_print_usage("map"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    int json;
    const char *filename = image_and_output(argc, argv, output, &json);
    if (!filename) {
        return 1;
    }
    BlockNode *bs = tool_open(filename, fmt, tool_open_flags(0, force_share));
    if (!bs) {
        return 1;
    }
    int ret = 0;
    int64_t len = vd_getlength(bs);
    if (len < 0) {
        tool_error("Could not get image length: %s", strerror((int)-len));
        vd_node_unref(bs);
        return 1;
    }
    uint64_t length = (uint64_t)len;
    if (max_length != UINT64_MAX && start + max_length < length) {
        length = start + max_length;
    }
    if (json) {
        putchar('[');
    } else {
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    }
    MapEntry curr = { .start = start }, next;
    while (curr.start + curr.length < length) {
        uint64_t offset = curr.start + curr.length;
        uint64_t n = length - offset;
        if (n > (1ull << 30)) {
            n = 1ull << 30; /* probe up to 1 GiB at a time, like qemu-img */
        }
        int r = map_block_status(bs, offset, n, &next);
        if (r < 0) {
            fflush(stdout);
            tool_error("Could not read file metadata: %s", strerror(-r));
            ret = 1;
            goto out;
        }
        if (map_mergeable(&curr, &next)) {
            curr.length += next.length;
            continue;
        }
        if (curr.length > 0 && map_dump(json, &curr, &next) < 0) {
            ret = 1;
            goto out;
        }
        curr = next;
    }
    if (map_dump(json, &curr, NULL) < 0) {
        ret = 1;
        goto out;
    }
    if (json) {
        puts("]");
    }
out:
    fflush(stdout);
    vd_node_unref(bs);
    return ret;
}

/* ---- check ---- */

static void check_dump_human(const VdCheckResult *r, bool quiet)
{
    if (quiet) {
        return;
    }
    if (!(r->corruptions || r->leaks || r->check_errors)) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            printf("\n%d errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.\n",
                   r->corruptions);
        }
        if (r->leaks) {
            printf("\n%d leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n",
                   r->leaks);
        }
        if (r->check_errors) {
            printf("\n%d internal errors have occurred during the check.\n", r->check_errors);
        }
    }
    if (r->total_clusters != 0 && r->allocated_clusters != 0) {
        printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% "
               "compressed clusters\n",
               r->allocated_clusters, r->total_clusters,
               r->allocated_clusters * 100.0 / r->total_clusters,
               r->fragmented_clusters * 100.0 / r->allocated_clusters,
               r->compressed_clusters * 100.0 / r->allocated_clusters);
    }
    if (r->image_end_offset) {
        printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
    }
}

static void check_dump_json(const VdCheckResult *r, const char *filename, const char *format,
                            bool quiet)
{
    if (quiet) {
        return;
    }
    /* Insertion order = QAPI ImageCheck member order; the printer applies QEMU's key order. */
    json_t *o = json_object();
    if (!o) {
        return;
    }
    json_object_set_new(o, "filename", json_string(filename));
    json_object_set_new(o, "format", json_string(format));
    json_object_set_new(o, "check-errors", json_integer(r->check_errors));
    if (r->image_end_offset) {
        json_object_set_new(o, "image-end-offset", json_integer((json_int_t)r->image_end_offset));
    }
    if (r->corruptions) {
        json_object_set_new(o, "corruptions", json_integer(r->corruptions));
    }
    if (r->leaks) {
        json_object_set_new(o, "leaks", json_integer(r->leaks));
    }
    if (r->corruptions_fixed) {
        json_object_set_new(o, "corruptions-fixed", json_integer(r->corruptions_fixed));
    }
    if (r->leaks_fixed) {
        json_object_set_new(o, "leaks-fixed", json_integer(r->leaks_fixed));
    }
    if (r->total_clusters) {
        json_object_set_new(o, "total-clusters", json_integer((json_int_t)r->total_clusters));
    }
    if (r->allocated_clusters) {
        json_object_set_new(o, "allocated-clusters",
                            json_integer((json_int_t)r->allocated_clusters));
    }
    if (r->fragmented_clusters) {
        json_object_set_new(o, "fragmented-clusters",
                            json_integer((json_int_t)r->fragmented_clusters));
    }
    if (r->compressed_clusters) {
        json_object_set_new(o, "compressed-clusters",
                            json_integer((json_int_t)r->compressed_clusters));
    }
    qjson_print(stdout, o);
    json_decref(o);
}

int img_check(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "repair", required_argument, NULL, 'r' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *output = NULL;
    bool force_share = false, quiet = false;
    const char *src_cache = "writeback";
    int fix = 0, flags = VD_OPEN_CHECK, cflags;
    int c;
    while ((c = getopt_long(argc, argv, ":hf:r:T:qU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'r':
            flags |= VD_OPEN_RDWR;
            if (!strcmp(optarg, "leaks")) {
                fix = VD_FIX_LEAKS;
            } else if (!strcmp(optarg, "all")) {
                fix = VD_FIX_LEAKS | VD_FIX_ERRORS;
            } else {
                tool_usage_error("Unknown option value for -r (expecting 'leaks' or 'all'): "
                                 "%s", optarg);
                return 1;
            }
            break;
        case OPT_OUTPUT: output = optarg; break;
        case 'T': src_cache = optarg; break;
        case 'q': quiet = true; break;
        case 'U': force_share = true; break;
        case 'h': tool_print_usage("check"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    int json;
    const char *filename = image_and_output(argc, argv, output, &json);
    if (!filename) {
        return 1;
    }
    if (tool_cache_flags(src_cache, &cflags) < 0) {
        tool_error("Invalid source cache option: %s", src_cache);
        return 1;
    }
    flags |= cflags & VD_OPEN_DIRECT;
    if (fix && force_share) {
        tool_error("-U is not allowed with -r");
        return 1;
    }
    /* Opened with its backing chain, as qemu-img does: a broken chain fails the check. */
    BlockNode *bs = tool_open(filename, fmt, tool_open_flags(flags, force_share));
    if (!bs) {
        return 1;
    }
    const char *format = bs->drv->name;
    VdCheckResult res;
    memset(&res, 0, sizeof(res));
    VdError *err = NULL;
    int ret = vd_check(bs, &res, fix, &err);
    if (ret == -ENOTSUP) {
        vd_error_free(err);
        tool_error("This image format does not support checks");
        vd_check_result_clear(&res);
        vd_node_unref(bs);
        return 63;
    }
    if (ret == 0 && (res.corruptions_fixed || res.leaks_fixed)) {
        int cf = res.corruptions_fixed, lf = res.leaks_fixed;
        if (!json && !quiet) {
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %d leaked clusters\n"
                   "    %d corruptions\n\n"
                   "Double checking the fixed image now...\n",
                   lf, cf);
        }
        vd_check_result_clear(&res);
        memset(&res, 0, sizeof(res));
        vd_error_free(err);
        err = NULL;
        ret = vd_check(bs, &res, 0, &err);
        res.corruptions_fixed = cf;
        res.leaks_fixed = lf;
    }
    if (ret == 0) {
        if (json) {
            check_dump_json(&res, filename, format, quiet);
        } else {
            check_dump_human(&res, quiet);
        }
    }
    fflush(stdout);
    int rc;
    if (ret < 0 || res.check_errors) {
        if (ret < 0) {
            tool_error("Check failed: %s", err ? vd_error_msg(err) : strerror(-ret));
        } else {
            tool_error("Check failed");
        }
        rc = 1;
    } else if (res.corruptions) {
        rc = 2;
    } else if (res.leaks) {
        rc = 3;
    } else {
        rc = 0;
    }
    vd_error_free(err);
    vd_check_result_clear(&res);
    vd_node_unref(bs);
    return rc;
}
