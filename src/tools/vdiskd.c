/*
 * vdiskd.c - the daemon: builds block nodes (--blockdev), serves them over NBD (--nbd-server,
 * --export, qemu-storage-daemon syntax) and is controlled over QMP (--qmp PATH).
 * Promises: SIGTERM/SIGINT/QMP quit stop accepting, let in-flight requests finish, flush and close
 * every image, and exit 0. Signals are blocked in every thread and taken by the main thread only.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "block/graph.h"
#include "jobs/job.h"
#include "jobs/journal.h"
#include "jobs/mirror.h"
#include "nbd/nbd-server.h"
#include "protocols/nbd.h"
#include "qmp/qmp.h"
#include "util/error.h"
#include "util/log.h"
#include "util/sockperm.h"

#define PROG "vdiskd"

static int verbose;

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: " PROG " [options]\n"
            "  --blockdev JSON|key=val,...     add a block node (blockdev-add options)\n"
            "  --object tls-creds-x509,id=ID,dir=DIR[,endpoint=server|client][,verify-peer=on|off]\n"
            "  --object tls-creds-psk,id=ID,dir=DIR[,endpoint=server|client][,username=U]\n"
            "  --object authz-simple,id=ID,identity=NAME\n"
            "  --object authz-list,id=ID[,policy=deny|allow][,rules.N.match=M,rules.N.policy=P\n"
            "               [,rules.N.format=exact|glob]...] (or --object '{JSON}')\n"
            "  --object authz-listfile,id=ID,filename=FILE[,refresh=on|off]\n"
            "  --object secret,id=ID,data=SECRET|file=PATH[,format=raw|base64]\n"
            "  --nbd-server addr.type=inet,addr.host=H,addr.port=P[,max-connections=N]\n"
            "  --nbd-server addr.type=unix,addr.path=P[,max-connections=N]\n"
            "               [,tls-creds=ID[,tls-authz=ID]] (NBD over TLS, required of clients)\n"
            "  --export type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on|off]"
            "[,description=TEXT]\n"
            "  --qmp PATH                      serve QMP on a unix socket\n"
            "  --qmp-max-clients N             QMP clients at once (default 64); one more makes\n"
            "                                  the client quiet longest disconnect\n"
            "  --socket-group GROUP            unix sockets (QMP, NBD) mode 0660 for GROUP\n"
            "                                  (default 0600: the daemon's user only)\n"
            "  --pidfile PATH                  write the daemon's pid\n"
            "  --daemonize                     detach once everything is set up\n"
            "  --state-dir DIR                 keep live copies' progress in DIR: after a crash or\n"
            "                                  restart they come back PAUSED (job-resume); default:\n"
            "                                  $STATE_DIRECTORY (systemd's StateDirectory=), else\n"
            "                                  none; '' = none\n"
            "  --nbd-connect-timeout MS        NBD client nodes: give up on a server that does not\n"
            "                                  complete connect + handshake in MS ms (default "
            "30000; 0 = wait forever)\n"
            "  -v, --verbose                   more messages (repeat for more)\n"
            "  -h, --help\n");
}

/* ---- QEMU-style "key=value,key=value" lists (",," is a literal comma) ---- */

typedef struct KvList {
    size_t n;
    char **keys;
    char **vals;
} KvList;

static void kv_free(KvList *kv)
{
    for (size_t i = 0; i < kv->n; i++) {
        free(kv->keys[i]);
        free(kv->vals[i]);
    }
    free(kv->keys);
    free(kv->vals);
    memset(kv, 0, sizeof(*kv));
}

static int kv_parse(const char *s, KvList *kv, VdError **errp)
{
    memset(kv, 0, sizeof(*kv));
    const char *p = s;
    while (*p) {
        const char *eq = strchr(p, '=');
        const char *comma = strchr(p, ',');
        if (!eq || (comma && comma < eq)) {
            vd_error_setg(errp, EINVAL, "expected key=value in '%s'", s);
            kv_free(kv);
            return -EINVAL;
        }
        char *key = strndup(p, (size_t)(eq - p));
        char *val = malloc(strlen(eq) + 1);
        char **nk = realloc(kv->keys, (kv->n + 1) * sizeof(char *));
        if (nk) {
            kv->keys = nk;
        }
        char **nv = realloc(kv->vals, (kv->n + 1) * sizeof(char *));
        if (nv) {
            kv->vals = nv;
        }
        if (!key || !val || !nk || !nv) {
            free(key);
            free(val);
            kv_free(kv);
            vd_error_setg(errp, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        size_t o = 0;
        p = eq + 1;
        while (*p) {
            if (*p == ',') {
                if (p[1] == ',') {
                    val[o++] = ',';
                    p += 2;
                    continue;
                }
                p++;
                break;
            }
            val[o++] = *p++;
        }
        val[o] = 0;
        kv->keys[kv->n] = key;
        kv->vals[kv->n] = val;
        kv->n++;
    }
    return 0;
}

static const char *kv_get(const KvList *kv, const char *key)
{
    const char *v = NULL;
    for (size_t i = 0; i < kv->n; i++) {
        if (strcmp(kv->keys[i], key) == 0) {
            v = kv->vals[i]; /* last one wins, like QEMU */
        }
    }
    return v;
}

/* The N of key "PREFIX.N" when pattern is "PREFIX.*" (a keyval list element), else -1. */
static long list_index(const char *key, const char *pattern)
{
    size_t pl = strlen(pattern);
    if (pl < 2 || strcmp(pattern + pl - 2, ".*") != 0 || strncmp(key, pattern, pl - 1) != 0) {
        return -1;
    }
    const char *digits = key + pl - 1;
    char *end;
    errno = 0;
    long v = strtol(digits, &end, 10);
    return *digits >= '0' && *digits <= '9' && !*end && !errno && v < 65536 ? v : -1;
}

static int kv_check_keys(const KvList *kv, const char *const *allowed, const char *what,
                         VdError **errp)
{
    for (size_t i = 0; i < kv->n; i++) {
        bool ok = false;
        for (const char *const *a = allowed; *a; a++) {
            ok |= strcmp(*a, kv->keys[i]) == 0 || list_index(kv->keys[i], *a) >= 0;
        }
        if (!ok) {
            vd_error_setg(errp, EINVAL, "%s: unknown parameter '%s'", what, kv->keys[i]);
            return -EINVAL;
        }
    }
    return 0;
}

static int parse_bool(const char *v, bool *out)
{
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes")) {
        *out = true;
    } else if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no")) {
        *out = false;
    } else {
        return -EINVAL;
    }
    return 0;
}

/* ---- the options ---- */

/* A keyval value as JSON: on/off/true/false become booleans, plain integers numbers. */
static json_t *keyval_value(const char *key, const char *v)
{
    const char *leaf = strrchr(key, '.');
    leaf = leaf ? leaf + 1 : key;
    bool is_name = !strcmp(leaf, "filename") || !strcmp(leaf, "node-name") ||
                   !strcmp(leaf, "file") || !strcmp(leaf, "backing") || !strcmp(leaf, "path") ||
                   !strcmp(leaf, "snapshot") || !strcmp(leaf, "match") || !strcmp(leaf, "identity") ||
                   !strcmp(leaf, "id") || !strcmp(leaf, "data") || !strcmp(leaf, "keyid") ||
                   !strcmp(leaf, "iv") || !strcmp(leaf, "key-secret");
    if (!is_name) {
        if (!strcmp(v, "on") || !strcmp(v, "true")) {
            return json_true();
        }
        if (!strcmp(v, "off") || !strcmp(v, "false")) {
            return json_false();
        }
        char *end;
        errno = 0;
        long long n = strtoll(v, &end, 10);
        if (*v && !*end && !errno) {
            return json_integer(n);
        }
    }
    if (!strcmp(v, "null") && !strcmp(leaf, "backing")) {
        return json_null();
    }
    return json_string(v);
}

/* QEMU's keyval lists: an object whose keys are exactly 0..n-1 becomes an array, at any depth. */
static json_t *keyval_lists(json_t *v)
{
    if (!json_is_object(v)) {
        return v;
    }
    const char *key;
    json_t *child;
    void *tmp;
    json_object_foreach_safe(v, tmp, key, child) {
        json_object_set_new(v, key, keyval_lists(json_incref(child)));
    }
    size_t n = json_object_size(v);
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++) {
        char idx[24];
        snprintf(idx, sizeof(idx), "%zu", i);
        if (!(child = json_object_get(v, idx))) {
            json_decref(arr);
            return v;
        }
        json_array_append(arr, child);
    }
    if (!arr || n == 0) {
        json_decref(arr);
        return v;
    }
    json_decref(v);
    return arr;
}

/* QSD's dotted form: driver=qcow2,node-name=n,file.driver=file,file.filename=x -> nested object. */
static json_t *keyval_to_json(const char *arg, VdError **errp)
{
    KvList kv;
    if (kv_parse(arg, &kv, errp) < 0) {
        return NULL;
    }
    json_t *root = json_object();
    for (size_t i = 0; root && i < kv.n; i++) {
        json_t *obj = root;
        char *key = kv.keys[i], *dot;
        while ((dot = strchr(key, '.'))) {
            *dot = 0;
            json_t *child = json_object_get(obj, key);
            if (!child) {
                child = json_object();
                json_object_set_new(obj, key, child);
            }
            if (!json_is_object(child)) {
                vd_error_setg(errp, EINVAL, "--blockdev: '%s' is both a value and an object", key);
                json_decref(root);
                root = NULL;
                break;
            }
            obj = child;
            key = dot + 1;
        }
        if (root) {
            json_object_set_new(obj, key, keyval_value(kv.keys[i], kv.vals[i]));
        }
    }
    kv_free(&kv);
    return keyval_lists(root);
}

static int do_blockdev(const char *arg, VdError **errp)
{
    json_error_t jerr = {0};
    json_t *opts;
    if (arg[strspn(arg, " \t")] == '{') {
        opts = json_loads(arg, 0, &jerr);
    } else if (!(opts = keyval_to_json(arg, errp))) {
        return -EINVAL;
    }
    if (!opts || !json_is_object(opts)) {
        json_decref(opts);
        vd_error_setg(errp, EINVAL, "--blockdev: expected a JSON object: %s",
                      opts ? "not an object" : jerr.text);
        return -EINVAL;
    }
    BlockNode *bs = qmp_blockdev_add(opts, errp);
    json_decref(opts);
    if (!bs) {
        vd_error_prepend(errp, "--blockdev: ");
        return -EINVAL;
    }
    vd_log(VD_LOG_INFO, "added node '%s'", bs->node_name ? bs->node_name : "?");
    return 0;
}

static int do_nbd_server(const char *arg, VdError **errp)
{
    static const char *const keys[] = {"addr.type", "addr.host", "addr.port", "addr.path",
                                       "max-connections", "tls-creds", "tls-authz", NULL};
    KvList kv;
    int r = kv_parse(arg, &kv, errp);
    if (r < 0) {
        return r;
    }
    if ((r = kv_check_keys(&kv, keys, "--nbd-server", errp)) < 0) {
        kv_free(&kv);
        return r;
    }
    NbdServerAddress addr = {.type = NBD_ADDR_INET};
    const char *type = kv_get(&kv, "addr.type");
    uint32_t maxc = 0;
    const char *mc = kv_get(&kv, "max-connections");
    if (mc) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(mc, &end, 10);
        if (errno || *end || !*mc || v > UINT32_MAX) {
            vd_error_setg(errp, EINVAL, "--nbd-server: invalid max-connections '%s'", mc);
            kv_free(&kv);
            return -EINVAL;
        }
        maxc = (uint32_t)v;
    }
    if (!type || !strcmp(type, "inet")) {
        addr.host = (char *)kv_get(&kv, "addr.host");
        addr.port = (char *)kv_get(&kv, "addr.port");
    } else if (!strcmp(type, "unix")) {
        addr.type = NBD_ADDR_UNIX;
        addr.path = (char *)kv_get(&kv, "addr.path");
        if (!addr.path) {
            vd_error_setg(errp, EINVAL, "--nbd-server: addr.path is required for unix");
            kv_free(&kv);
            return -EINVAL;
        }
    } else {
        vd_error_setg(errp, EINVAL, "--nbd-server: unsupported addr.type '%s'", type);
        kv_free(&kv);
        return -EINVAL;
    }
    VdTlsCreds *creds;
    VdAuthz *authz;
    r = nbd_server_tls_lookup(kv_get(&kv, "tls-creds"), kv_get(&kv, "tls-authz"), &creds,
                              &authz, errp);
    if (r < 0) {
        vd_error_prepend(errp, "--nbd-server: ");
        kv_free(&kv);
        return r;
    }
    r = nbd_server_start_tls(&addr, maxc, creds, authz, errp);
    if (r < 0) {
        vd_tls_creds_unref(creds);
        vd_authz_unref(authz);
    } else {
        if (addr.type == NBD_ADDR_UNIX) {
            vd_log(VD_LOG_INFO, "NBD server listening on %s", addr.path);
        } else {
            vd_log(VD_LOG_INFO, "NBD server listening on %s:%s", addr.host ? addr.host : "127.0.0.1",
                 addr.port ? addr.port : "10809");
        }
    }
    kv_free(&kv);
    return r;
}

/* bitmaps.0=NAME,bitmaps.1=... (as qemu-storage-daemon): bitmaps of bs or its backing chain,
 * numbered from 0 without gaps. Their count, or -errno. */
static int export_bitmaps(const KvList *kv, BlockNode *bs, VdBitmapRef *refs, int max,
                          VdError **errp)
{
    int n = 0;
    for (size_t i = 0; i < kv->n; i++) {
        n += list_index(kv->keys[i], "bitmaps.*") >= 0;
    }
    if (n > max) {
        vd_error_setg(errp, EINVAL, "--export: at most %d bitmaps", max);
        return -EINVAL;
    }
    for (int k = 0; k < n; k++) {
        refs[k].name = NULL;
        for (size_t i = 0; i < kv->n; i++) {
            if (list_index(kv->keys[i], "bitmaps.*") == k) {
                refs[k].name = kv->vals[i];
            }
        }
        if (!refs[k].name) {
            vd_error_setg(errp, EINVAL, "--export: bitmaps.%d is missing", k);
            return -EINVAL;
        }
        refs[k].node = vd_bitmap_find_in_chain(bs, refs[k].name);
        if (!refs[k].node) {
            vd_error_setg(errp, ENOENT, "Bitmap '%s' is not found", refs[k].name);
            return -ENOENT;
        }
    }
    return n;
}

/* QSD's --object TYPE,id=ID,...: object-add's arguments, the type as the bare first word. */
static int do_object(const char *arg, VdError **errp)
{
    const char *comma = strchr(arg, ',');
    size_t tl = comma ? (size_t)(comma - arg) : strlen(arg);
    json_t *opts;
    json_error_t jerr = {0};
    if (arg[strspn(arg, " \t")] == '{') { /* QSD's JSON form */
        if (!(opts = json_loads(arg, 0, &jerr)) || !json_is_object(opts)) {
            vd_error_setg(errp, EINVAL, "--object: expected a JSON object: %s",
                          opts ? "not an object" : jerr.text);
            json_decref(opts);
            return -EINVAL;
        }
    } else if (memchr(arg, '=', tl)) {
        opts = keyval_to_json(arg, errp); /* qom-type=TYPE,... */
    } else {
        opts = keyval_to_json(comma ? comma + 1 : "", errp);
        if (opts) {
            json_object_set_new(opts, "qom-type", json_stringn(arg, tl));
        }
    }
    if (!opts) {
        vd_error_prepend(errp, "--object: ");
        return -EINVAL;
    }
    int r = qmp_object_add(opts, errp);
    json_decref(opts);
    if (r < 0) {
        vd_error_prepend(errp, "--object: ");
    }
    return r;
}

static int do_export(const char *arg, VdError **errp)
{
    static const char *const keys[] = {"type", "id", "node-name", "name", "writable",
                                       "description", "writethrough", "bitmaps.*",
                                       "allocation-depth", NULL};
    KvList kv;
    /* QSD allows the type as a bare first word: --export nbd,id=... */
    char *owned = NULL;
    if (!strncmp(arg, "nbd,", 4) || !strcmp(arg, "nbd")) {
        if (asprintf(&owned, "type=%s", arg) < 0) {
            vd_error_setg(errp, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        arg = owned;
    }
    int r = kv_parse(arg, &kv, errp);
    free(owned);
    if (r < 0) {
        return r;
    }
    if ((r = kv_check_keys(&kv, keys, "--export", errp)) < 0) {
        kv_free(&kv);
        return r;
    }
    const char *type = kv_get(&kv, "type"), *id = kv_get(&kv, "id");
    const char *node_name = kv_get(&kv, "node-name");
    const char *w = kv_get(&kv, "writable");
    const char *ad = kv_get(&kv, "allocation-depth");
    bool writable = false, alloc_depth = false;
    r = -EINVAL;
    if (!type || strcmp(type, "nbd") != 0) {
        vd_error_setg(errp, EINVAL, "--export: only type=nbd is supported");
    } else if (!id || !node_name) {
        vd_error_setg(errp, EINVAL, "--export: id and node-name are required");
    } else if (w && parse_bool(w, &writable) < 0) {
        vd_error_setg(errp, EINVAL, "--export: writable must be on or off");
    } else if (ad && parse_bool(ad, &alloc_depth) < 0) {
        vd_error_setg(errp, EINVAL, "--export: allocation-depth must be on or off");
    } else {
        BlockNode *bs = graph_find_node(node_name);
        if (!bs) {
            vd_error_setg(errp, ENOENT, "--export: node '%s' not found", node_name);
        } else {
            /* A resumed copy of this node: guests write through its filter. */
            BlockNode *filter = mirror_filter_of_source(bs);
            const char *name = kv_get(&kv, "name");
            VdBitmapRef refs[64];
            int n = export_bitmaps(&kv, bs, refs, 64, errp);
            NbdExport *exp = n < 0 ? NULL
                             : nbd_export_add_full(id, name ? name : node_name,
                                                   filter ? filter : bs, writable,
                                                   kv_get(&kv, "description"), refs, (size_t)n,
                                                   alloc_depth, errp);
            if (exp) {
                vd_log(VD_LOG_INFO, "exporting '%s' as '%s'%s", node_name, nbd_export_name(exp),
                     writable ? " (writable)" : "");
                r = 0;
            }
        }
    }
    kv_free(&kv);
    return r;
}

/* ---- lifecycle ---- */

static void quit_handler(void)
{
    kill(getpid(), SIGTERM); /* the main thread does the orderly shutdown */
}

/* Written last, atomically (rename), so its appearance means "ready": exports are all served. */
static int write_pidfile(const char *path, VdError **errp)
{
    char buf[32];
    char *tmp = NULL;
    int n = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
    if (asprintf(&tmp, "%s.tmp", path) < 0) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int e = fd < 0 ? errno : 0;
    if (fd >= 0) {
        if (write(fd, buf, (size_t)n) != n) {
            e = errno ? errno : EIO;
        }
        if (close(fd) < 0 && !e) {
            e = errno;
        }
        if (!e && rename(tmp, path) < 0) {
            e = errno;
        }
        if (e) {
            unlink(tmp);
        }
    }
    if (e) {
        free(tmp);
        vd_error_setg_errno(errp, e, "cannot write pidfile '%s'", path);
        return -e;
    }
    free(tmp);
    return 0;
}

static void free_ptr(void *p)
{
    free(*(void **)p);
}

enum { OPT_BLOCKDEV = 256, OPT_NBD_SERVER, OPT_EXPORT, OPT_QMP, OPT_PIDFILE, OPT_DAEMONIZE,
       OPT_NBD_CONNECT_TIMEOUT, OPT_QMP_MAX_CLIENTS, OPT_SOCKET_GROUP, OPT_OBJECT,
       OPT_STATE_DIR };

/*
 * Default bound on an NBD client node's connect + handshake: blockdev-add runs on the QMP thread,
 * and a server that accepts but never answers must not freeze the monitor (the server side uses
 * the same 30 s for its handshake).
 */
#define DEFAULT_NBD_CONNECT_TIMEOUT_MS 30000

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"object", required_argument, NULL, OPT_OBJECT},
        {"blockdev", required_argument, NULL, OPT_BLOCKDEV},
        {"nbd-server", required_argument, NULL, OPT_NBD_SERVER},
        {"export", required_argument, NULL, OPT_EXPORT},
        {"qmp", required_argument, NULL, OPT_QMP},
        {"qmp-max-clients", required_argument, NULL, OPT_QMP_MAX_CLIENTS},
        {"socket-group", required_argument, NULL, OPT_SOCKET_GROUP},
        {"pidfile", required_argument, NULL, OPT_PIDFILE},
        {"daemonize", no_argument, NULL, OPT_DAEMONIZE},
        {"state-dir", required_argument, NULL, OPT_STATE_DIR},
        {"nbd-connect-timeout", required_argument, NULL, OPT_NBD_CONNECT_TIMEOUT},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    /* cleanup: freed on every return path, including the daemonizing parent's */
    const char **blockdevs __attribute__((cleanup(free_ptr))) = calloc((size_t)argc, sizeof(char *));
    const char **exports __attribute__((cleanup(free_ptr))) = calloc((size_t)argc, sizeof(char *));
    const char **objects __attribute__((cleanup(free_ptr))) = calloc((size_t)argc, sizeof(char *));
    size_t nblockdevs = 0, nexports = 0, nobjects = 0;
    const char *nbd_server = NULL, *qmp_path = NULL, *pidfile = NULL, *state_dir = NULL;
    bool daemonize = false;
    int nbd_connect_timeout_ms = DEFAULT_NBD_CONNECT_TIMEOUT_MS;
    /*
     * glibc gives each thread that allocates its own malloc arena (up to 8 per core), each keeping
     * freed memory; vdiskd has dozens of threads (up to 16 NBD workers, a reader and a writer per
     * client, job threads) that all allocate small per-request structures. Two arenas keep the
     * contention low and the RSS from multiplying per thread (measured: 4k O_DIRECT reads 12.5 ->
     * 11.3 MiB peak; large I/O buffers do not come from malloc at all: nbd-transmission.c).
     */
    mallopt(M_ARENA_MAX, 2);
    if (!blockdevs || !exports || !objects) {
        fprintf(stderr, PROG ": out of memory\n");
        return 1;
    }
    int c;
    while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_OBJECT:
            objects[nobjects++] = optarg;
            break;
        case OPT_BLOCKDEV:
            blockdevs[nblockdevs++] = optarg;
            break;
        case OPT_NBD_SERVER:
            if (nbd_server) {
                fprintf(stderr, PROG ": --nbd-server may be given only once\n");
                return 1;
            }
            nbd_server = optarg;
            break;
        case OPT_EXPORT:
            exports[nexports++] = optarg;
            break;
        case OPT_QMP:
            qmp_path = optarg;
            break;
        case OPT_PIDFILE:
            pidfile = optarg;
            break;
        case OPT_QMP_MAX_CLIENTS: {
            char *end = NULL;
            errno = 0;
            long n = strtol(optarg, &end, 10);
            if (errno || end == optarg || *end || n < 1 || n > 65536) {
                fprintf(stderr, PROG ": --qmp-max-clients: expected 1 to 65536, got '%s'\n",
                        optarg);
                return 1;
            }
            qmp_server_set_max_clients((unsigned)n);
            break;
        }
        case OPT_SOCKET_GROUP: {
            VdError *gerr = NULL;
            if (vd_socket_set_group(optarg, &gerr) < 0) {
                vd_error_report_free(PROG, gerr);
                return 1;
            }
            break;
        }
        case OPT_DAEMONIZE:
            daemonize = true;
            break;
        case OPT_STATE_DIR:
            state_dir = optarg;
            break;
        case OPT_NBD_CONNECT_TIMEOUT: {
            char *end = NULL;
            errno = 0;
            long ms = strtol(optarg, &end, 10);
            if (errno || end == optarg || *end || ms < 0 || ms > 3600000) {
                fprintf(stderr, PROG ": --nbd-connect-timeout: expected milliseconds (0 to "
                        "3600000), got '%s'\n", optarg);
                return 1;
            }
            nbd_connect_timeout_ms = ms == 0 ? -1 : (int)ms;
            break;
        }
        case 'v':
            verbose++;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (verbose) {
        vd_log_set_level(verbose > 1 ? VD_LOG_DEBUG : VD_LOG_INFO);
    }
    vd_nbd_set_connect_timeout(nbd_connect_timeout_ms);
    /* The NBD client's events (a reconnection to another export) go to the QMP clients. */
    vd_nbd_set_event_sink(qmp_event_emit);
    if (optind < argc) {
        fprintf(stderr, PROG ": unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    /*
     * No --state-dir: the directory systemd made for the service (StateDirectory=, the packaged
     * unit's /var/lib/vdisk; the first one if it lists several), else none - a vdiskd run by hand
     * (tests, trials, several side by side) leaves no journal behind. --state-dir '' = none.
     */
    char env_state_dir[PATH_MAX];
    const char *sd_env = getenv("STATE_DIRECTORY");
    if (!state_dir && sd_env && *sd_env) {
        size_t n = strcspn(sd_env, ":");
        if (n < sizeof(env_state_dir)) {
            memcpy(env_state_dir, sd_env, n);
            env_state_dir[n] = '\0';
            state_dir = env_state_dir;
        }
    }
    if (state_dir && !*state_dir) {
        state_dir = NULL;
    }

    /* Fork before any thread exists; the parent exits with the child's setup status. */
    int status_pipe[2] = {-1, -1};
    if (daemonize) {
        if (pipe2(status_pipe, O_CLOEXEC) < 0) {
            perror(PROG ": pipe");
            return 1;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror(PROG ": fork");
            return 1;
        }
        if (pid > 0) {
            close(status_pipe[1]);
            char st = 1;
            ssize_t n;
            do {
                n = read(status_pipe[0], &st, 1);
            } while (n < 0 && errno == EINTR);
            if (n != 1) {
                int ws;
                waitpid(pid, &ws, 0);
                return 1;
            }
            return st;
        }
        close(status_pipe[0]);
        setsid();
    }

    /* Only the main thread takes the shutdown signals (threads inherit this mask). */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    VdError *err = NULL;
    int r = 0;
    /* Objects first: blockdevs (NBD clients) and the NBD server name them. */
    for (size_t i = 0; i < nobjects && r == 0; i++) {
        r = do_object(objects[i], &err);
    }
    for (size_t i = 0; i < nblockdevs && r == 0; i++) {
        r = do_blockdev(blockdevs[i], &err);
    }
    /*
     * Journalled copies come back (PAUSED) before any export exists: their filters are in front
     * of the sources, so an export created below serves the filter and no guest write is missed.
     */
    if (r == 0 && state_dir && (r = job_journal_set_dir(state_dir, &err)) == 0) {
        int n = mirror_resume_journals();
        if (n) {
            vd_log(VD_LOG_INFO, "%d block job(s) resumed from '%s', paused", n, state_dir);
        }
    }
    if (r == 0 && nbd_server) {
        r = do_nbd_server(nbd_server, &err);
    }
    if (r == 0 && nexports && !nbd_server_running()) {
        vd_error_setg(&err, EINVAL, "--export needs --nbd-server");
        r = -EINVAL;
    }
    for (size_t i = 0; i < nexports && r == 0; i++) {
        r = do_export(exports[i], &err);
    }
    if (r == 0 && qmp_path) {
        qmp_set_quit_handler(quit_handler);
        r = qmp_server_start(qmp_path, &err);
        if (r == 0) {
            vd_log(VD_LOG_INFO, "QMP listening on %s", qmp_path);
        }
    }
    if (r == 0 && pidfile) {
        r = write_pidfile(pidfile, &err);
    }
    if (r < 0) {
        vd_error_report_free(PROG, err);
        nbd_server_stop();
        if (qmp_path) {
            qmp_server_stop();
        }
        graph_close_all();
        if (daemonize) {
            char st = 1;
            ssize_t w = write(status_pipe[1], &st, 1);
            (void)w;
        }
        return 1;
    }
    if (daemonize) {
        char st = 0;
        ssize_t w = write(status_pipe[1], &st, 1);
        (void)w;
        close(status_pipe[1]);
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, STDIN_FILENO);
            dup2(devnull, STDOUT_FILENO);
            if (!verbose) {
                dup2(devnull, STDERR_FILENO);
            }
            close(devnull);
        }
    }

    int sig = 0;
    while (sigwait(&sigs, &sig) != 0) {
    }
    vd_log(VD_LOG_INFO, "signal %d: shutting down", sig);

    /*
     * Order matters: no new QMP command can touch the graph or the exports; jobs are cancelled
     * while exports still exist (a mirror puts its exports back on the source); then no new NBD
     * work, in-flight requests finish, and finally every image is flushed and closed.
     */
    if (qmp_path) {
        qmp_server_stop();
    }
    if (state_dir) {
        /*
         * Journalled jobs survive the stop: no guest write may reach a source after its copy's
         * filter is gone, so the guests stop first, then the jobs (keeping their journals).
         */
        job_journal_keep_all();
        nbd_server_stop();
    }
    job_cancel_all_sync();
    nbd_server_stop();
    graph_close_all();
    if (pidfile) {
        unlink(pidfile);
    }
    vd_log(VD_LOG_INFO, "exit");
    return 0;
}
