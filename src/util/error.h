/*
 * error.h - error objects carried from where a failure is detected to where the user sees it.
 *
 * Library functions return 0 or -errno and, when given a non-NULL errp, attach a one-line message.
 * The first error set wins: setting an error on an errp that already holds one keeps the old one.
 */
#ifndef VDISK_UTIL_ERROR_H
#define VDISK_UTIL_ERROR_H

#include <stdarg.h>

typedef struct VdError VdError;

/* Set *errp (if errp != NULL and *errp == NULL) to a new error; code is a positive errno value. */
void vd_error_setg(VdError **errp, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Same, appending ": strerror(code)". */
void vd_error_setg_errno(VdError **errp, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefix the message already in *errp (no-op if none). */
void vd_error_prepend(VdError **errp, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Move src into *dst (or free it if dst is NULL or already set). */
void vd_error_propagate(VdError **dst, VdError *src);

const char *vd_error_msg(const VdError *err);
int vd_error_code(const VdError *err);
void vd_error_free(VdError *err);

/* Print "prog: message" on stderr and free err. */
void vd_error_report_free(const char *prog, VdError *err);

#endif
