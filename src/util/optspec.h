/*
 * optspec.h - the shape of an option object as a static table: member names, JSON types, required,
 * enum values, nested members, where a parsed value goes in a typed struct. Drivers declare their
 * blockdev-add options with it (BlockDriver.blockdev_options) and QMP commands their arguments
 * (qmp-args.h, which checks objects against such tables); the tables themselves know no JSON.
 */
#ifndef VDISK_UTIL_OPTSPEC_H
#define VDISK_UTIL_OPTSPEC_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    VD_OPT_STR,      /* JSON string */
    VD_OPT_BOOL,     /* true / false */
    VD_OPT_INT,      /* any JSON integer (int64) */
    VD_OPT_U16,      /* integer 0..UINT16_MAX */
    VD_OPT_U32,      /* integer 0..UINT32_MAX */
    VD_OPT_U64,      /* integer >= 0 */
    VD_OPT_OBJ,      /* object, checked by the caller (or nested spec below) */
    VD_OPT_ARRAY,    /* array, contents checked by the caller */
    VD_OPT_ENUM,     /* string from enum_values */
    VD_OPT_REF,      /* BlockdevRef: object or node-name string */
    VD_OPT_REF_NULL, /* BlockdevRefOrNull: object, node-name string or null */
    VD_OPT_ANY,      /* anything: accepted and ignored by vdiskd */
    VD_OPT_ALT,      /* QAPI alternate of a string from enum_values and an object; alt_name */
    VD_OPT_SOCKADDR  /* SocketAddress (flat): object, its "type" picks the variant's members */
} VdOptType;

typedef struct VdOptSpec {
    const char *name;
    VdOptType type;
    bool required;
    const char *const *enum_values; /* VD_OPT_ENUM: NULL-terminated */
    const struct VdOptSpec *nested; /* VD_OPT_OBJ: member list of the nested object, or NULL */
    const char *alt_name;           /* VD_OPT_ALT: the alternate's QAPI name, for errors */
    /*
     * Where a parser stores the value in the caller's struct: VD_OPT_AT(Type, field); 0 = not
     * stored. The field's C type follows the member's: STR const char * (borrowed from the
     * arguments: valid while they are), BOOL bool, INT int64_t, U16 uint16_t, U32 uint32_t, U64 uint64_t, ENUM
     * int (the index in enum_values), anything else json_t * (borrowed). A member that is absent
     * leaves its field as the caller initialised it: that is the default.
     */
    size_t at;
    size_t has_at; /* optional VD_OPT_AT of a bool set to true when the member is present */
    /*
     * Accepted by the schema but not honoured by vdisk: present, it is refused (ENOTSUP) with
     * "'<name>' is not supported by vdiskd" and this hint after it ("" for none). NULL: honoured.
     */
    const char *unsupported;
} VdOptSpec;

/* A field of the request struct a spec member fills (offset + 1, so that 0 means "none"). */
#define VD_OPT_AT(type, field) (offsetof(type, field) + 1)

/*
 * Read access to an option object already checked against its spec, for the layer that declared
 * the spec: str returns the string member at a dotted path ("server.host"), or NULL if absent;
 * num the integer member there (>= 0) in *out, false if absent.
 */
typedef struct VdOptReader {
    const char *(*str)(const struct VdOptReader *r, const char *path);
    bool (*num)(const struct VdOptReader *r, const char *path, unsigned long long *out);
} VdOptReader;

#endif
