/*
 * qmp-args.h - QAPI-style checking of a command's "arguments" object (and nested option objects
 * such as blockdev-add's) against a static member list, with QEMU's error texts, so a QMP client
 * sees the same "Parameter 'x' is missing" / "... is unexpected" / "Invalid parameter type" replies.
 * Pure functions: no state, callable from any thread.
 */
#ifndef VDISK_QMP_QMP_ARGS_H
#define VDISK_QMP_QMP_ARGS_H

#include <stdbool.h>
#include <jansson.h>

#include "util/error.h"

typedef enum {
    QA_STR,      /* JSON string */
    QA_BOOL,     /* true / false */
    QA_INT,      /* any JSON integer (int64) */
    QA_U32,      /* integer 0..UINT32_MAX */
    QA_U64,      /* integer >= 0 */
    QA_OBJ,      /* object, checked by the caller (or nested spec below) */
    QA_ARRAY,    /* array, contents checked by the caller */
    QA_ENUM,     /* string from enum_values */
    QA_REF,      /* BlockdevRef: object or node-name string */
    QA_REF_NULL, /* BlockdevRefOrNull: object, node-name string or null */
    QA_ANY       /* anything: accepted and ignored by vdiskd */
} QmpArgType;

typedef struct QmpArgSpec {
    const char *name;
    QmpArgType type;
    bool required;
    const char *const *enum_values; /* QA_ENUM: NULL-terminated */
    const struct QmpArgSpec *nested; /* QA_OBJ: member list of the nested object, or NULL */
} QmpArgSpec;

/*
 * Check obj's members against the specs (each a list ended by {NULL}), visiting members in spec
 * order as QEMU's visitor does (first missing/mistyped member wins), then reporting the first
 * member no spec names. prefix ("" or "file.") is prepended to names in messages. obj NULL is
 * treated as {}. Returns 0 or -EINVAL with *errp set.
 */
int qmp_args_check(json_t *obj, const char *prefix, const QmpArgSpec *const *specs, int nspecs,
                   VdError **errp);
/* Convenience: one spec list. */
int qmp_args_check1(json_t *obj, const char *prefix, const QmpArgSpec *spec, VdError **errp);

/*
 * The server reports ENOENT as DeviceNotFound and ENODEV as DeviceNotActive (qmp.h). Lower layers
 * use those codes for plain "No such file/device" failures, which QEMU reports as GenericError:
 * re-code them to EIO.
 */
void qmp_error_not_device(VdError **errp);

/* Accessors with defaults (after checking). */
const char *qmp_arg_str(json_t *obj, const char *name, const char *dflt);
bool qmp_arg_bool(json_t *obj, const char *name, bool dflt);

#endif
