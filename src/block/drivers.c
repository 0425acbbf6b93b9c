/*
 * drivers.c - the one driver registry: which formats and protocols exist, and which of them a
 * filename or a file's first bytes name. Nothing else in the tree lists or compares drivers; a new
 * format or protocol is its own file plus one line in builtin_drivers below (docs/architecture.md).
 * The built-in list is constant; vd_register_driver adds to it before any open (one thread).
 */
#include <errno.h>
#include <string.h>

#include "block/block.h"

extern const BlockDriver vd_drv_qcow2, vd_drv_raw, vd_drv_file, vd_drv_host_device, vd_drv_nbd,
    vd_drv_rbd, vd_drv_null_co, vd_drv_blkdebug;
extern const BlockDriver vd_drv_luks;

/* Format probing asks formats in this order (the first of equal scores wins). */
static const BlockDriver *const builtin_drivers[] = {
    &vd_drv_qcow2,
    &vd_drv_luks,
    &vd_drv_raw,
    &vd_drv_file,
    &vd_drv_host_device,
    &vd_drv_nbd,
    &vd_drv_rbd,
    &vd_drv_null_co,
    &vd_drv_blkdebug,
};

#define N_BUILTIN (sizeof(builtin_drivers) / sizeof(builtin_drivers[0]))
#define MAX_EXTRA_DRIVERS 8

static const BlockDriver *extra_drivers[MAX_EXTRA_DRIVERS];
static size_t n_extra_drivers;

const BlockDriver *vd_driver_at(size_t i)
{
    if (i < N_BUILTIN) {
        return builtin_drivers[i];
    }
    i -= N_BUILTIN;
    return i < n_extra_drivers ? extra_drivers[i] : NULL;
}

int vd_register_driver(const BlockDriver *drv)
{
    if (!drv || !drv->name) {
        return -EINVAL;
    }
    if (vd_find_driver(drv->name)) {
        return -EEXIST;
    }
    if (n_extra_drivers >= MAX_EXTRA_DRIVERS) {
        return -ENOSPC;
    }
    extra_drivers[n_extra_drivers++] = drv;
    return 0;
}

const BlockDriver *vd_find_driver(const char *name)
{
    if (!name) {
        return NULL;
    }
    const BlockDriver *d;
    for (size_t i = 0; (d = vd_driver_at(i)); i++) {
        if (!strcmp(d->name, name)) {
            return d;
        }
    }
    return NULL;
}

/* Length of the scheme of "scheme://...", or 0 when s has none. */
static size_t uri_scheme_len(const char *s)
{
    const char *p = s;
    while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
           *p == '+' || *p == '-' || *p == '.') {
        p++;
    }
    return p != s && !strncmp(p, "://", 3) ? (size_t)(p - s) : 0;
}

/* The protocol whose filename_prefix starts s, or NULL. */
static const BlockDriver *driver_by_prefix(const char *s)
{
    const BlockDriver *d;
    for (size_t i = 0; (d = vd_driver_at(i)); i++) {
        if (d->is_protocol && d->filename_prefix &&
            !strncmp(s, d->filename_prefix, strlen(d->filename_prefix))) {
            return d;
        }
    }
    return NULL;
}

bool vd_filename_is_uri(const char *s)
{
    /* "scheme://...", "json:{...}", "rbd:...": not host paths, never resolved or stat()ed. */
    return !strncmp(s, "json:", 5) || uri_scheme_len(s) > 0 || driver_by_prefix(s) != NULL;
}

static bool driver_has_scheme(const BlockDriver *d, const char *scheme, size_t len)
{
    for (const char *const *s = d->uri_schemes; s && *s; s++) {
        if (strlen(*s) == len && !strncmp(*s, scheme, len)) {
            return true;
        }
    }
    return false;
}

const BlockDriver *vd_protocol_for(const char *filename, VdError **errp)
{
    const BlockDriver *d = driver_by_prefix(filename);
    if (d) {
        return d;
    }
    size_t len = uri_scheme_len(filename);
    bool uri = vd_filename_is_uri(filename);
    for (size_t i = 0; !uri && (d = vd_driver_at(i)); i++) {
        if (d->is_protocol && d->probe_device && d->probe_device(filename)) {
            return d;
        }
    }
    for (size_t i = 0; (d = vd_driver_at(i)); i++) {
        if (d->is_protocol &&
            (uri ? driver_has_scheme(d, filename, len) : d->opens_host_paths)) {
            return d;
        }
    }
    vd_error_setg(errp, ENOTSUP, "Could not open '%s': unknown protocol", filename);
    return NULL;
}

const BlockDriver *vd_probe_bytes(const uint8_t *buf, size_t len, const char *filename,
                                  int *score)
{
    const BlockDriver *best = NULL;
    int best_score = 0;
    const BlockDriver *d;
    for (size_t i = 0; (d = vd_driver_at(i)); i++) {
        if (d->is_protocol || !d->probe) {
            continue;
        }
        int s = d->probe(buf, len, filename);
        if (s > best_score) {
            best_score = s;
            best = d;
        }
    }
    if (score) {
        *score = best_score;
    }
    return best;
}
