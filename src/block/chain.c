/*
 * chain.c - what jobs that reshape a chain share (chain.h): the backing name an overlay records for
 * its new base, and a second node of an image opened read-write or read-only. Pure functions of
 * their arguments; the caller serialises changes to one node.
 */
#include "block/chain.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Not a host path: a URI, "json:" or a protocol's own prefix (the driver registry knows them). */
static bool is_uri(const char *s)
{
    return s && vd_filename_is_uri(s);
}

/* base's file by a canonical absolute name (URIs unchanged). */
char *vd_backing_name_absolute(BlockNode *base)
{
    if (!base) {
        return NULL;
    }
    char *real = is_uri(base->filename) ? NULL : realpath(base->filename, NULL);
    return real ? real : strdup(base->filename);
}

char *vd_backing_name(BlockNode *overlay, BlockNode *base)
{
    if (!base) {
        return NULL;
    }
    if (is_uri(base->filename) || !overlay || !overlay->filename || is_uri(overlay->filename)) {
        return strdup(base->filename);
    }
    /* The header's own style: an absolute name stays absolute, anything else is relative. */
    char *abs = vd_backing_name_absolute(base);
    if (!abs || (overlay->backing_file && overlay->backing_file[0] == '/')) {
        return abs;
    }
    char *rel = vd_relative_path(overlay->filename, abs);
    free(abs);
    return rel;
}

BlockNode *vd_reopen(BlockNode *bs, bool rw, VdError **errp)
{
    VdOpenOptions o = {
        .filename = bs->filename,
        .format = bs->drv->name,
        .node_name = bs->node_name,
        .flags = (rw ? VD_OPEN_RDWR : 0) | (bs->open_flags & VD_OPEN_DIRECT) |
                 (bs->backing ? 0 : VD_OPEN_NO_BACKING),
        .backing = bs->backing,
    };
    BlockNode *n = vd_open(&o, errp);
    if (!n) {
        vd_error_prepend(errp, "Could not reopen '%s' %s: ", bs->filename,
                         rw ? "read-write" : "read-only");
    }
    return n;
}
