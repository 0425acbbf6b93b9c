/*
 * error.c - error objects (see error.h). An error is a heap-allocated code + message; the first one
 * set on an errp is kept so that the root cause, not a later symptom, reaches the user.
 */
#include "util/error.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct VdError {
    int code;
    char *msg;
};

static void error_setv(VdError **errp, int code, const char *suffix, const char *fmt, va_list ap)
{
    if (!errp || *errp) {
        return;
    }
    char *body = NULL;
    if (vasprintf(&body, fmt, ap) < 0) {
        body = NULL;
    }
    VdError *err = calloc(1, sizeof(*err));
    if (!err) {
        free(body);
        return;
    }
    err->code = code > 0 ? code : EIO;
    if (suffix && body) {
        char *full = NULL;
        if (asprintf(&full, "%s: %s", body, suffix) >= 0) {
            free(body);
            body = full;
        }
    }
    err->msg = body ? body : strdup("out of memory while reporting an error");
    *errp = err;
}

void vd_error_setg(VdError **errp, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_setv(errp, code, NULL, fmt, ap);
    va_end(ap);
}

void vd_error_setg_errno(VdError **errp, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_setv(errp, code, strerror(code > 0 ? code : EIO), fmt, ap);
    va_end(ap);
}

void vd_error_prepend(VdError **errp, const char *fmt, ...)
{
    if (!errp || !*errp) {
        return;
    }
    char *prefix = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&prefix, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    char *full = NULL;
    if (asprintf(&full, "%s%s", prefix, (*errp)->msg ? (*errp)->msg : "") >= 0) {
        free((*errp)->msg);
        (*errp)->msg = full;
    }
    free(prefix);
}

void vd_error_propagate(VdError **dst, VdError *src)
{
    if (!src) {
        return;
    }
    if (dst && !*dst) {
        *dst = src;
    } else {
        vd_error_free(src);
    }
}

const char *vd_error_msg(const VdError *err)
{
    return err && err->msg ? err->msg : "unknown error";
}

int vd_error_code(const VdError *err)
{
    return err ? err->code : 0;
}

void vd_error_free(VdError *err)
{
    if (err) {
        free(err->msg);
        free(err);
    }
}

void vd_error_report_free(const char *prog, VdError *err)
{
    fprintf(stderr, "%s: %s\n", prog, vd_error_msg(err));
    vd_error_free(err);
}
