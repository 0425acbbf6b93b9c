/*
 * qmp-commands-object.c - object-add / object-del for the objects vdiskd has (util/tls-creds.h,
 * util/secret.h): tls-creds-x509, tls-creds-psk, authz-simple, authz-list, authz-listfile and
 * secret, with QEMU's ObjectOptions union as the argument table (every other qom-type QEMU knows
 * is refused by name). vdiskd's --object goes through qmp_object_add too, so the command line and
 * QMP accept exactly the same objects; an authz-listfile's file is read with authz-list's own table.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"
#include "util/secret.h"
#include "util/tls-creds.h"

/* QEMU 7.2's ObjectType, so an unknown type gets QEMU's "does not accept value". */
static const char *const qom_type_enum[] = {
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus", "can-host-socketcan",
    "colo-compare", "cryptodev-backend", "cryptodev-backend-builtin", "cryptodev-backend-lkcf",
    "cryptodev-vhost-user", "dbus-vmstate", "filter-buffer", "filter-dump", "filter-mirror",
    "filter-redirector", "filter-replay", "filter-rewriter", "input-barrier", "input-linux",
    "iothread", "main-loop", "memory-backend-epc", "memory-backend-file", "memory-backend-memfd",
    "memory-backend-ram", "pef-guest", "pr-manager-helper", "qtest", "rng-builtin", "rng-egd",
    "rng-random", "secret", "secret_keyring", "sev-guest", "thread-context", "s390-pv-guest",
    "throttle-group", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites",
    "x-remote-object", "x-vfio-user-server", NULL};
static const char *const endpoint_enum[] = {"client", "server", NULL};
static const char *const policy_enum[] = {"deny", "allow", NULL}; /* QAuthZListPolicy */
static const char *const format_enum[] = {"exact", "glob", NULL}; /* QAuthZListFormat */
static const char *const secret_format_enum[] = {"raw", "base64", NULL};

typedef struct ObjectAddArgs {
    int qom_type; /* index in qom_type_enum */
    const char *id, *dir, *priority, *username, *identity, *passwordid, *filename;
    int endpoint; /* index in endpoint_enum */
    bool verify_peer;
    int policy;     /* authz-list: index in policy_enum */
    json_t *rules;  /* authz-list: [QAuthZListRule] */
    bool refresh;   /* authz-listfile */
    const char *data, *file, *keyid, *iv; /* secret */
    int format;                           /* secret: index in secret_format_enum */
} ObjectAddArgs;

#define OBJECT_BASE_MEMBERS                                                                  \
    {"qom-type", QA_ENUM, true, qom_type_enum, .at = QMP_AT(ObjectAddArgs, qom_type)},       \
    {"id", QA_STR, true, .at = QMP_AT(ObjectAddArgs, id)}

/* TlsCredsProperties' members, then each type's own (QEMU's order, which decides which error
 * a message with several bad members gets). */
#define TLS_CREDS_MEMBERS                                                                    \
    OBJECT_BASE_MEMBERS,                                                                     \
    {"verify-peer", QA_BOOL, .at = QMP_AT(ObjectAddArgs, verify_peer)},                      \
    {"dir", QA_STR, .at = QMP_AT(ObjectAddArgs, dir)},                                       \
    {"endpoint", QA_ENUM, false, endpoint_enum, .at = QMP_AT(ObjectAddArgs, endpoint)},      \
    {"priority", QA_STR, .at = QMP_AT(ObjectAddArgs, priority)},                             \
    {"loaded", QA_BOOL}

static const QmpArgSpec object_base_spec[] = {OBJECT_BASE_MEMBERS, {NULL}};
static const QmpArgSpec x509_spec[] = {
    TLS_CREDS_MEMBERS,
    {"sanity-check", QA_BOOL},
    {"passwordid", QA_STR, .at = QMP_AT(ObjectAddArgs, passwordid)},
    {NULL}};
static const QmpArgSpec psk_spec[] = {
    TLS_CREDS_MEMBERS,
    {"username", QA_STR, .at = QMP_AT(ObjectAddArgs, username)},
    {NULL}};
static const QmpArgSpec authz_simple_spec[] = {
    OBJECT_BASE_MEMBERS,
    {"identity", QA_STR, true, .at = QMP_AT(ObjectAddArgs, identity)},
    {NULL}};
#define AUTHZ_LIST_MEMBERS                                                                   \
    {"policy", QA_ENUM, false, policy_enum, .at = QMP_AT(ObjectAddArgs, policy)},            \
    {"rules", QA_ARRAY, .at = QMP_AT(ObjectAddArgs, rules)}
static const QmpArgSpec authz_list_spec[] = {OBJECT_BASE_MEMBERS, AUTHZ_LIST_MEMBERS, {NULL}};
static const QmpArgSpec authz_list_file_members[] = {AUTHZ_LIST_MEMBERS, {NULL}};
static const QmpArgSpec authz_listfile_spec[] = {
    OBJECT_BASE_MEMBERS,
    {"filename", QA_STR, true, .at = QMP_AT(ObjectAddArgs, filename)},
    {"refresh", QA_BOOL, .at = QMP_AT(ObjectAddArgs, refresh)},
    {NULL}};
static const QmpArgSpec rule_spec[] = { /* QAuthZListRule */
    {"match", QA_STR, true},
    {"policy", QA_ENUM, true, policy_enum},
    {"format", QA_ENUM, false, format_enum},
    {NULL}};

/* SecretCommonProperties, then SecretProperties' own. */
static const QmpArgSpec secret_spec[] = {
    OBJECT_BASE_MEMBERS,
    {"loaded", QA_BOOL},
    {"format", QA_ENUM, false, secret_format_enum, .at = QMP_AT(ObjectAddArgs, format)},
    {"keyid", QA_STR, .at = QMP_AT(ObjectAddArgs, keyid)},
    {"iv", QA_STR, .at = QMP_AT(ObjectAddArgs, iv)},
    {"data", QA_STR, .at = QMP_AT(ObjectAddArgs, data)},
    {"file", QA_STR, .at = QMP_AT(ObjectAddArgs, file)},
    {NULL}};

typedef struct ObjectVariant {
    const char *type;
    const QmpArgSpec *spec; /* the whole member list: base + variant */
} ObjectVariant;

static const ObjectVariant variants[] = {
    {"tls-creds-x509", x509_spec},
    {"tls-creds-psk", psk_spec},
    {"authz-simple", authz_simple_spec},
    {"authz-list", authz_list_spec},
    {"authz-listfile", authz_listfile_spec},
    {"secret", secret_spec},
    {NULL, NULL}};

/* An authz-list's members (checked against authz_list_spec's) into *out: 0 or -errno. */
static int rules_parse(const ObjectAddArgs *a, VdAuthzList *out, VdError **errp)
{
    size_t n = a->rules ? json_array_size(a->rules) : 0;
    *out = (VdAuthzList){.allow = a->policy == 1};
    if (n && !(out->rules = calloc(n, sizeof(*out->rules)))) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *r = json_array_get(a->rules, i);
        char prefix[48];
        snprintf(prefix, sizeof(prefix), "rules[%zu].", i);
        if (qmp_args_check1(r, prefix, rule_spec, errp) < 0) {
            vd_authz_list_clear(out);
            return -EINVAL;
        }
        VdAuthzRule *rule = &out->rules[out->n];
        rule->allow = !strcmp(qmp_arg_str(r, "policy", ""), "allow");
        rule->glob = !strcmp(qmp_arg_str(r, "format", "exact"), "glob");
        if (!(rule->match = strdup(qmp_arg_str(r, "match", "")))) {
            vd_authz_list_clear(out);
            vd_error_setg(errp, ENOMEM, "Out of memory");
            return -ENOMEM;
        }
        out->n++;
    }
    return 0;
}

/* VdAuthzListParse: an authz-listfile's text, a JSON object of authz-list's members. */
static int listfile_parse(const char *text, const char *filename, VdAuthzList *out,
                          VdError **errp)
{
    json_error_t jerr;
    json_t *obj = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    int r = -EINVAL;
    ObjectAddArgs a = {0};
    if (!obj) {
        vd_error_setg(errp, EINVAL, "JSON parse error in '%s': %s", filename, jerr.text);
    } else if (!json_is_object(obj)) {
        vd_error_setg(errp, EINVAL, "File '%s' must contain a JSON object", filename);
    } else if (qmp_args_parse(obj, authz_list_file_members, &a, errp) == 0) {
        r = rules_parse(&a, out, errp);
    }
    json_decref(obj);
    return r;
}

static int add_checked(const char *type, const ObjectAddArgs *a, VdError **errp)
{
    if (!strcmp(type, "authz-simple")) {
        return vd_authz_simple_add(a->id, a->identity, errp);
    }
    if (!strcmp(type, "authz-list")) {
        VdAuthzList list;
        int r = rules_parse(a, &list, errp);
        return r < 0 ? r : vd_authz_list_add(a->id, &list, errp);
    }
    if (!strcmp(type, "authz-listfile")) {
        return vd_authz_listfile_add(a->id, a->filename, a->refresh, listfile_parse, errp);
    }
    if (!strcmp(type, "secret")) {
        VdSecretOptions so = {.id = a->id, .data = a->data, .file = a->file,
                              .format = secret_format_enum[a->format], .keyid = a->keyid,
                              .iv = a->iv};
        return vd_secret_add(&so, errp);
    }
    if (a->passwordid) {
        vd_error_setg(errp, ENOTSUP, "passwordid (an encrypted private key) is not supported "
                      "by vdiskd");
        return -ENOTSUP;
    }
    if (!a->dir) {
        vd_error_setg(errp, EINVAL, "Missing 'dir' property value");
        return -EINVAL;
    }
    VdTlsCredsOptions o = {.id = a->id, .psk = !strcmp(type, "tls-creds-psk"), .dir = a->dir,
                           .server = a->endpoint == 1, .verify_peer = a->verify_peer,
                           .priority = a->priority, .username = a->username};
    return vd_tls_creds_add(&o, errp);
}

int qmp_object_add(json_t *args, VdError **errp)
{
    /* The union's tag and id first (QEMU's order): the tag decides which members are expected. */
    json_t *base = json_object();
    const char *keys[] = {"qom-type", "id"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(args, keys[i]);
        if (v) {
            json_object_set(base, keys[i], v);
        }
    }
    ObjectAddArgs a = {.verify_peer = true, .refresh = true};
    int r = qmp_args_parse(base, object_base_spec, &a, errp);
    json_decref(base);
    if (r < 0) {
        return r;
    }
    const char *type = qom_type_enum[a.qom_type];
    const ObjectVariant *v = variants;
    while (v->type && strcmp(v->type, type) != 0) {
        v++;
    }
    if (!v->type) {
        vd_error_setg(errp, ENOTSUP, "Object type '%s' is not supported by vdiskd (supported: "
                      "tls-creds-x509, tls-creds-psk, authz-simple, authz-list, authz-listfile, "
                      "secret)", type);
        return -ENOTSUP;
    }
    if ((r = qmp_args_parse(args, v->spec, &a, errp)) < 0) {
        return r;
    }
    return add_checked(type, &a, errp);
}

static json_t *cmd_object_add(json_t *args, VdError **errp)
{
    if (qmp_object_add(args, errp) < 0) {
        qmp_error_not_device(errp); /* a missing file is a GenericError in QEMU */
        return NULL;
    }
    return json_object();
}

static const QmpArgSpec object_del_args[] = {{"id", QA_STR, true}, {NULL}};

static json_t *cmd_object_del(json_t *args, VdError **errp)
{
    if (vd_object_del(qmp_arg_str(args, "id", ""), errp) < 0) {
        qmp_error_not_device(errp);
        return NULL;
    }
    return json_object();
}

void qmp_commands_object_register(void)
{
    /* ObjectOptions is a union on "qom-type": qmp_object_add checks the variant's members. */
    qmp_register_command("object-add", NULL, cmd_object_add);
    qmp_register_command("object-del", object_del_args, cmd_object_del);
}
