/*
 * qmp-args.c - argument checking for QMP commands and option objects (see qmp-args.h).
 * Messages follow QEMU's QAPI input visitor word for word so clients can match on them.
 * Stateless; safe from any thread.
 */
#include "qmp/qmp-args.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

const QmpArgSpec qmp_no_args[] = {{NULL}};

static const char *const sockaddr_types[] = {"inet", "unix", "vsock", "fd", NULL};
const QmpArgSpec qmp_sockaddr_tag[] = {{"type", QA_ENUM, true, sockaddr_types}, {NULL}};
const QmpArgSpec qmp_sockaddr_inet[] = {
    {"host", QA_STR, true},
    {"port", QA_STR, true},
    {"numeric", QA_BOOL},
    {"to", QA_U16},
    {"ipv4", QA_BOOL},
    {"ipv6", QA_BOOL},
    {"keep-alive", QA_BOOL},
    {"mptcp", QA_BOOL},
    {NULL}};
const QmpArgSpec qmp_sockaddr_unix[] = {
    {"path", QA_STR, true},
    {"abstract", QA_BOOL},
    {"tight", QA_BOOL},
    {NULL}};

int qmp_sockaddr_variant(json_t *addr, const char *prefix, const char *tag_prefix,
                         const QmpArgSpec **variant, VdError **errp)
{
    json_t *t = json_object_get(addr, "type");
    if (!t) {
        vd_error_setg(errp, EINVAL, "Parameter '%stype' is missing", prefix);
        return -EINVAL;
    }
    json_t *tonly = json_pack("{s:O}", "type", t);
    int r = tonly ? qmp_args_check1(tonly, tag_prefix, qmp_sockaddr_tag, errp) : -ENOMEM;
    json_decref(tonly);
    if (r < 0) {
        if (r == -ENOMEM) {
            vd_error_setg(errp, ENOMEM, "out of memory");
        }
        return r;
    }
    const char *type = json_string_value(t);
    *variant = !strcmp(type, "inet") ? qmp_sockaddr_inet
             : !strcmp(type, "unix") ? qmp_sockaddr_unix : NULL;
    if (!*variant) {
        vd_error_setg(errp, ENOTSUP, "NBD server address type '%s' is not supported by vdiskd "
                      "(use inet or unix)", type);
        return -ENOTSUP;
    }
    return 0;
}

static const char *type_name(QmpArgType t)
{
    switch (t) {
    case QA_STR:
    case QA_ENUM:
        return "string";
    case QA_BOOL:
        return "boolean";
    case QA_INT:
    case QA_U16:
    case QA_U32:
    case QA_U64:
        return "integer";
    case QA_OBJ:
    case QA_SOCKADDR:
        return "object";
    case QA_ARRAY:
        return "array";
    case QA_REF:
        return "BlockdevRef";
    case QA_REF_NULL:
        return "BlockdevRefOrNull";
    case QA_ANY:
    case QA_ALT: /* named by the spec's alt_name */
        break;
    }
    return "value";
}

static int check_member(json_t *v, const char *prefix, const QmpArgSpec *s, VdError **errp)
{
    bool ok = true;
    switch (s->type) {
    case QA_STR:
        ok = json_is_string(v);
        break;
    case QA_BOOL:
        ok = json_is_boolean(v);
        break;
    case QA_INT:
        ok = json_is_integer(v);
        break;
    case QA_U16:
    case QA_U32:
    case QA_U64:
        if (!json_is_integer(v)) {
            vd_error_setg(errp, EINVAL, "Parameter '%s%s' expects uint64", prefix, s->name);
            return -EINVAL;
        }
        /*
         * QEMU reads every unsigned member as a uint64 (negative numbers as their two's
         * complement), then checks the narrower range, naming the member without its path.
         */
        if (s->type != QA_U64) {
            json_int_t max = s->type == QA_U16 ? (json_int_t)UINT16_MAX : (json_int_t)UINT32_MAX;
            if (json_integer_value(v) < 0 || json_integer_value(v) > max) {
                vd_error_setg(errp, EINVAL, "Parameter '%s' expects %s", s->name,
                              s->type == QA_U16 ? "uint16_t" : "uint32_t");
                return -EINVAL;
            }
        }
        return 0;
    case QA_OBJ:
    case QA_SOCKADDR: /* the union's variant: checked by whoever reads it (qmp-blockdev.c) */
        ok = json_is_object(v);
        break;
    case QA_ARRAY:
        ok = json_is_array(v);
        break;
    case QA_ENUM:
        if (!json_is_string(v)) {
            ok = false;
            break;
        }
        for (const char *const *e = s->enum_values; e && *e; e++) {
            if (!strcmp(*e, json_string_value(v))) {
                return 0;
            }
        }
        /* QEMU's enum visitor names the member alone, without its path ('aio', not 'file.aio') */
        vd_error_setg(errp, EINVAL, "Parameter '%s' does not accept value '%s'", s->name,
                      json_string_value(v));
        return -EINVAL;
    case QA_REF:
        ok = json_is_object(v) || json_is_string(v);
        break;
    case QA_REF_NULL:
        ok = json_is_object(v) || json_is_string(v) || json_is_null(v);
        break;
    case QA_ANY:
        return 0;
    case QA_ALT:
        ok = json_is_object(v);
        if (json_is_string(v)) {
            QmpArgSpec as_enum = *s;
            as_enum.type = QA_ENUM;
            return check_member(v, prefix, &as_enum, errp);
        }
        break;
    }
    if (!ok) {
        vd_error_setg(errp, EINVAL, "Invalid parameter type for '%s%s', expected: %s", prefix,
                      s->name, s->type == QA_ALT ? s->alt_name : type_name(s->type));
        return -EINVAL;
    }
    if (s->type == QA_OBJ && s->nested) {
        char sub[512];
        snprintf(sub, sizeof(sub), "%s%s.", prefix, s->name);
        return qmp_args_check1(v, sub, s->nested, errp);
    }
    return 0;
}

int qmp_args_check(json_t *obj, const char *prefix, const QmpArgSpec *const *specs, int nspecs,
                   VdError **errp)
{
    if (obj && !json_is_object(obj)) {
        vd_error_setg(errp, EINVAL, "Invalid parameter type for '%.*s', expected: object",
                      prefix[0] ? (int)strlen(prefix) - 1 : 0, prefix);
        return -EINVAL;
    }
    for (int i = 0; i < nspecs; i++) {
        for (const QmpArgSpec *s = specs[i]; s->name; s++) {
            json_t *v = obj ? json_object_get(obj, s->name) : NULL;
            if (!v) {
                if (s->required) {
                    vd_error_setg(errp, EINVAL, "Parameter '%s%s' is missing", prefix, s->name);
                    return -EINVAL;
                }
                continue;
            }
            int r = check_member(v, prefix, s, errp);
            if (r < 0) {
                return r;
            }
        }
    }
    const char *key;
    json_t *val;
    json_object_foreach(obj, key, val) {
        bool known = false;
        for (int i = 0; i < nspecs && !known; i++) {
            for (const QmpArgSpec *s = specs[i]; s->name; s++) {
                if (!strcmp(s->name, key)) {
                    known = true;
                    break;
                }
            }
        }
        if (!known) {
            vd_error_setg(errp, EINVAL, "Parameter '%s%s' is unexpected", prefix, key);
            return -EINVAL;
        }
    }
    return 0;
}

int qmp_args_check1(json_t *obj, const char *prefix, const QmpArgSpec *spec, VdError **errp)
{
    const QmpArgSpec *const specs[] = {spec};
    return qmp_args_check(obj, prefix, specs, 1, errp);
}

static void store_member(json_t *v, const QmpArgSpec *s, char *out)
{
    void *f = out + s->at - 1;
    switch (s->type) {
    case QA_STR:
        *(const char **)f = json_string_value(v);
        break;
    case QA_BOOL:
        *(bool *)f = json_is_true(v);
        break;
    case QA_INT:
        *(int64_t *)f = json_integer_value(v);
        break;
    case QA_U16:
        *(uint16_t *)f = (uint16_t)json_integer_value(v);
        break;
    case QA_U32:
        *(uint32_t *)f = (uint32_t)json_integer_value(v);
        break;
    case QA_U64:
        *(uint64_t *)f = (uint64_t)json_integer_value(v); /* negative: two's complement, as QEMU */
        break;
    case QA_ENUM:
        *(int *)f = 0;
        for (int i = 0; s->enum_values[i]; i++) {
            if (!strcmp(s->enum_values[i], json_string_value(v))) {
                *(int *)f = i;
                break;
            }
        }
        break;
    default:
        *(json_t **)f = v;
        break;
    }
}

int qmp_args_parse(json_t *obj, const QmpArgSpec *spec, void *out, VdError **errp)
{
    int r = qmp_args_check1(obj, "", spec, errp);
    if (r < 0) {
        return r;
    }
    for (const QmpArgSpec *s = spec; s->name; s++) {
        json_t *v = obj ? json_object_get(obj, s->name) : NULL;
        if (!v) {
            continue;
        }
        if (s->at) {
            store_member(v, s, out);
        }
        if (s->has_at) {
            *(bool *)((char *)out + s->has_at - 1) = true;
        }
    }
    return 0;
}

const char *qmp_arg_str(json_t *obj, const char *name, const char *dflt)
{
    json_t *v = obj ? json_object_get(obj, name) : NULL;
    return json_is_string(v) ? json_string_value(v) : dflt;
}

bool qmp_arg_bool(json_t *obj, const char *name, bool dflt)
{
    json_t *v = obj ? json_object_get(obj, name) : NULL;
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

void qmp_error_not_device(VdError **errp)
{
    if (errp && *errp && (vd_error_code(*errp) == ENOENT || vd_error_code(*errp) == ENODEV)) {
        VdError *n = NULL;
        vd_error_setg(&n, EIO, "%s", vd_error_msg(*errp));
        vd_error_free(*errp);
        *errp = n;
    }
}
