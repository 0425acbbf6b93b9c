/*
 * qmp-args.h - the one argument-spec mechanism of vdiskd's QMP: a command's members (name, JSON
 * type, required, enum values, where the value goes in a typed struct) in a static table. The
 * server checks every command's "arguments" against its table before the handler runs, with
 * QEMU's error texts ("Parameter 'x' is missing" / "... is unexpected" / "Invalid parameter type
 * for 'x', expected: string"); the handler then fills its typed request struct from the same
 * table (qmp_args_parse), so lower layers never see JSON. Pure functions, callable from any thread.
 */
#ifndef VDISK_QMP_QMP_ARGS_H
#define VDISK_QMP_QMP_ARGS_H

#include <stdbool.h>
#include <stddef.h>
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
    /*
     * Where qmp_args_parse stores the value in the caller's struct: QMP_AT(Type, field); 0 = not
     * stored. The field's C type follows the member's: QA_STR const char * (borrowed from the
     * arguments: valid while they are), QA_BOOL bool, QA_INT int64_t, QA_U32 uint32_t, QA_U64
     * uint64_t, QA_ENUM int (the index in enum_values), anything else json_t * (borrowed).
     * A member that is absent leaves its field as the caller initialised it: that is the default.
     */
    size_t at;
    size_t has_at; /* optional QMP_AT of a bool set to true when the member is present */
} QmpArgSpec;

/* The table of a command without arguments. */
extern const QmpArgSpec qmp_no_args[];

/* A field of the request struct a spec member fills (offset + 1, so that 0 means "none"). */
#define QMP_AT(type, field) (offsetof(type, field) + 1)

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
 * Check obj against spec (as qmp_args_check1 with prefix "") and store every present member
 * through its `at` into out. On error out is left untouched. Returns 0 or -EINVAL with *errp set.
 */
int qmp_args_parse(json_t *obj, const QmpArgSpec *spec, void *out, VdError **errp);

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
