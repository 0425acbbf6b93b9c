/*
 * info.c - qemu-img info's JSON object for one node, and the check dispatcher.
 *
 * vd_image_info produces exactly the keys `qemu-img info --output=json` prints for one image
 * (without "backing-image"; the tool nests the chain itself), in the same order, so scripts
 * comparing the two see no difference: "snapshots" only for images with internal snapshots,
 * "dirty-flag" only where QEMU's bdrv_get_info answers (the driver's is_dirty).
 * It only reads; no locks beyond the drivers' own.
 */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "block/block.h"

int vd_is_dirty(BlockNode *bs, bool *dirty)
{
    *dirty = false;
    return bs->drv->is_dirty ? bs->drv->is_dirty(bs, dirty) : -ENOTSUP;
}

static int64_t node_allocated_size(BlockNode *bs)
{
    if (bs->drv->allocated_size) {
        int64_t r = bs->drv->allocated_size(bs);
        if (r != -ENOTSUP) {
            return r;
        }
    }
    if (bs->file && bs->file != bs) {
        return node_allocated_size(bs->file);
    }
    return -ENOTSUP;
}

static int set_new(json_t *obj, const char *key, json_t *val)
{
    if (!val || json_object_set_new(obj, key, val) < 0) {
        return -ENOMEM;
    }
    return 0;
}

json_t *vd_image_info(BlockNode *bs, VdError **errp)
{
    if (!bs || !bs->drv) {
        vd_error_setg(errp, EINVAL, "No image");
        return NULL;
    }
    int64_t size = vd_getlength(bs);
    if (size < 0) {
        vd_error_setg_errno(errp, (int)-size, "Could not get the size of '%s'", bs->filename);
        return NULL;
    }
    json_t *o = json_object();
    if (!o) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    int ret = 0;
    /* qemu-img puts the internal snapshot list first, and only when there is one */
    json_t *snaps = bs->drv->get_snapshots ? bs->drv->get_snapshots(bs) : NULL;
    if (snaps && json_array_size(snaps) > 0) {
        ret |= set_new(o, "snapshots", snaps);
    } else {
        json_decref(snaps);
    }
    const char *full_backing = NULL;
    if (bs->backing_file && bs->backing_file[0]) {
        full_backing = bs->backing ? bs->backing->filename : bs->full_backing_filename;
        if (bs->backing_format) {
            ret |= set_new(o, "backing-filename-format", json_string(bs->backing_format));
        }
    }
    ret |= set_new(o, "virtual-size", json_integer(size));
    ret |= set_new(o, "filename", json_string(bs->filename));
    uint32_t csize = bs->drv->cluster_size ? bs->drv->cluster_size(bs) : 0;
    if (csize) {
        ret |= set_new(o, "cluster-size", json_integer(csize));
    }
    ret |= set_new(o, "format", json_string(bs->drv->name));
    int64_t actual = node_allocated_size(bs);
    if (actual >= 0) {
        ret |= set_new(o, "actual-size", json_integer(actual));
    }
    if (bs->drv->get_specific_info) {
        json_t *spec = bs->drv->get_specific_info(bs);
        if (spec) {
            ret |= set_new(o, "format-specific", spec);
        }
    }
    if (bs->backing_file && bs->backing_file[0]) {
        if (full_backing) {
            ret |= set_new(o, "full-backing-filename", json_string(full_backing));
        }
        ret |= set_new(o, "backing-filename", json_string(bs->backing_file));
    }
    if (bs->encrypted) {
        ret |= set_new(o, "encrypted", json_true());
    }
    bool dirty;
    if (vd_is_dirty(bs, &dirty) == 0) {
        ret |= set_new(o, "dirty-flag", json_boolean(dirty));
    }
    if (ret) {
        json_decref(o);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    return o;
}

int vd_check(BlockNode *bs, VdCheckResult *res, int fix, VdError **errp)
{
    memset(res, 0, sizeof(*res));
    if (!bs || !bs->drv) {
        vd_error_setg(errp, EINVAL, "No image");
        return -EINVAL;
    }
    res->filename = strdup(bs->filename);
    res->format = bs->drv->name;
    if (!res->filename) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    if (!bs->drv->check) {
        vd_error_setg(errp, ENOTSUP, "This image format does not support checks");
        return -ENOTSUP;
    }
    if ((fix & (VD_FIX_LEAKS | VD_FIX_ERRORS)) && bs->read_only) {
        vd_error_setg(errp, EPERM, "Cannot repair '%s': opened read-only", bs->filename);
        return -EPERM;
    }
    return bs->drv->check(bs, res, fix, errp);
}

void vd_check_result_clear(VdCheckResult *res)
{
    if (!res) {
        return;
    }
    free(res->filename);
    memset(res, 0, sizeof(*res));
}
