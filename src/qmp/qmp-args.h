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
#include "util/optspec.h"

/* QMP's names for the shared option spec (util/optspec.h). */
typedef VdOptType QmpArgType;
typedef VdOptSpec QmpArgSpec;
#define QA_STR VD_OPT_STR
#define QA_BOOL VD_OPT_BOOL
#define QA_INT VD_OPT_INT
#define QA_U16 VD_OPT_U16
#define QA_U32 VD_OPT_U32
#define QA_U64 VD_OPT_U64
#define QA_OBJ VD_OPT_OBJ
#define QA_ARRAY VD_OPT_ARRAY
#define QA_ENUM VD_OPT_ENUM
#define QA_REF VD_OPT_REF
#define QA_REF_NULL VD_OPT_REF_NULL
#define QA_ANY VD_OPT_ANY
#define QA_ALT VD_OPT_ALT
#define QA_SOCKADDR VD_OPT_SOCKADDR
#define QMP_AT VD_OPT_AT

/* The table of a command without arguments. */
extern const QmpArgSpec qmp_no_args[];

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

/*
 * SocketAddress, one table for every command that takes one (blockdev-add nbd "server",
 * nbd-server-start "addr"): the union's tag (QEMU's four types) and the inet and unix variants
 * (InetSocketAddress: "to" is a uint16, "mptcp" a bool, as qemu-storage-daemon 7.2 has them).
 */
extern const QmpArgSpec qmp_sockaddr_tag[];
extern const QmpArgSpec qmp_sockaddr_inet[];
extern const QmpArgSpec qmp_sockaddr_unix[];
/*
 * Check a SocketAddress's tag alone (unknown members are judged once the variant is known) and
 * set *variant to the members of the variants vdiskd serves (inet, unix). prefix names members
 * in "missing" messages, tag_prefix in the tag's type/value message. 0, -EINVAL, or -ENOTSUP for
 * vsock / fd.
 */
int qmp_sockaddr_variant(json_t *addr, const char *prefix, const char *tag_prefix,
                         const QmpArgSpec **variant, VdError **errp);

/* Accessors with defaults (after checking). */
const char *qmp_arg_str(json_t *obj, const char *name, const char *dflt);
bool qmp_arg_bool(json_t *obj, const char *name, bool dflt);

#endif
