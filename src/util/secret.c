/*
 * secret.c - secret objects: their options read into bytes (inline data, a file, base64), checked
 * as QEMU checks them, and handed to the object registry. Every buffer that held a secret's bytes
 * is wiped before it is freed, on success and on every error path.
 */
#include <errno.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/secret.h"

#define SECRET_FILE_MAX (1u << 20) /* a password or key, not a disk */

void vd_secret_free(void *p, size_t len)
{
    if (p) {
        explicit_bzero(p, len);
        free(p);
    }
}

/* The whole file into a new buffer (with room for a NUL); QEMU's "Unable to read" on failure. */
static int read_secret_file(const char *path, uint8_t **out, size_t *len, VdError **errp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    int e = 0;
    if (fd < 0 || fstat(fd, &st) < 0) {
        e = errno;
    } else if ((uint64_t)st.st_size > SECRET_FILE_MAX) {
        e = EFBIG;
    }
    if (e) {
        vd_error_setg(errp, e, "Unable to read %s: %s", path, strerror(e));
        if (fd >= 0) {
            close(fd);
        }
        return -e;
    }
    size_t cap = (size_t)st.st_size;
    uint8_t *buf = malloc(cap + 1);
    size_t n = 0;
    while (buf && n < cap) {
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            int e = r < 0 ? errno : EIO;
            vd_secret_free(buf, cap);
            close(fd);
            vd_error_setg(errp, e, "Unable to read %s: %s", path, strerror(e));
            return -e;
        }
        n += (size_t)r;
    }
    close(fd);
    if (!buf) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    *out = buf;
    *len = n;
    return 0;
}

/* Replace *buf (len bytes of base64 text) with the bytes it encodes. */
static int decode_base64(uint8_t **buf, size_t *len, VdError **errp)
{
    gnutls_datum_t in = {*buf, (unsigned int)*len}, dec = {NULL, 0};
    int r = gnutls_base64_decode2(&in, &dec);
    vd_secret_free(*buf, *len);
    *buf = NULL;
    if (r < 0) {
        vd_error_setg(errp, EINVAL, "Invalid base64 data in secret: %s", gnutls_strerror(r));
        return -EINVAL;
    }
    uint8_t *copy = malloc((size_t)dec.size + 1);
    if (copy) {
        memcpy(copy, dec.data, dec.size);
    }
    explicit_bzero(dec.data, dec.size);
    gnutls_free(dec.data);
    if (!copy) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    *buf = copy;
    *len = dec.size;
    return 0;
}

int vd_secret_add(const VdSecretOptions *o, VdError **errp)
{
    if (o->keyid || o->iv) {
        vd_error_setg(errp, ENOTSUP, "secrets encrypted with another secret (keyid, iv) are "
                      "not supported by vdisk");
        return -ENOTSUP;
    }
    bool base64 = false;
    if (o->format && !strcmp(o->format, "base64")) {
        base64 = true;
    } else if (o->format && strcmp(o->format, "raw") != 0) {
        vd_error_setg(errp, EINVAL, "Parameter 'format' does not accept value '%s'", o->format);
        return -EINVAL;
    }
    if (o->data && o->file) {
        vd_error_setg(errp, EINVAL, "'data' and 'file' are mutually exclusive");
        return -EINVAL;
    }
    if (!o->data && !o->file) {
        vd_error_setg(errp, EINVAL, "Either 'file' or 'data' must be provided");
        return -EINVAL;
    }
    uint8_t *buf = NULL;
    size_t len = 0;
    int r;
    if (o->file) {
        if ((r = read_secret_file(o->file, &buf, &len, errp)) < 0) {
            return r;
        }
    } else {
        len = strlen(o->data);
        if (!(buf = malloc(len + 1))) {
            vd_error_setg(errp, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        memcpy(buf, o->data, len);
    }
    if (base64 && (r = decode_base64(&buf, &len, errp)) < 0) {
        return r;
    }
    return vd_object_add_secret(o->id, buf, len, errp);
}

/* key=value pairs with ",," for a comma in a value; the values are unescaped in place. */
int vd_secret_add_keyval(const char *args, VdError **errp)
{
    size_t n = strlen(args);
    char *copy = malloc(n + 1);
    if (!copy) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    memcpy(copy, args, n + 1);
    VdSecretOptions o = {0};
    struct { const char *name; const char **at; } keys[] = {
        {"id", &o.id}, {"data", &o.data}, {"file", &o.file}, {"format", &o.format},
        {"keyid", &o.keyid}, {"iv", &o.iv}, {"loaded", NULL}};
    int r = 0;
    char *p = copy;
    while (*p && r == 0) {
        char *key = p, *eq = strchr(p, '=');
        if (!eq) {
            vd_error_setg(errp, EINVAL, "Expected '=' after parameter '%s'", key);
            r = -EINVAL;
            break;
        }
        *eq = 0;
        char *val = eq + 1, *w = val;
        for (p = val; *p; p++) {
            if (*p == ',' && p[1] == ',') {
                p++;
            } else if (*p == ',') {
                break;
            }
            *w++ = *p;
        }
        if (*p == ',') {
            p++;
        }
        *w = 0;
        size_t i = 0;
        while (i < sizeof(keys) / sizeof(keys[0]) && strcmp(keys[i].name, key) != 0) {
            i++;
        }
        if (i == sizeof(keys) / sizeof(keys[0])) {
            vd_error_setg(errp, EINVAL, "Property 'secret.%s' not found", key);
            r = -EINVAL;
        } else if (keys[i].at) {
            *keys[i].at = val;
        }
    }
    if (r == 0 && !o.id) {
        vd_error_setg(errp, EINVAL, "Parameter 'id' is missing");
        r = -EINVAL;
    }
    if (r == 0) {
        r = vd_secret_add(&o, errp);
    }
    explicit_bzero(copy, n);
    free(copy);
    return r;
}

/* UTF-8 well-formedness (no overlongs, no surrogates, nothing above U+10FFFF), as g_utf8_validate. */
static bool utf8_valid(const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        size_t n;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            n = 1; cp = c & 0x1f; min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2; cp = c & 0x0f; min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3; cp = c & 0x07; min = 0x10000;
        } else {
            return false;
        }
        if (len - i <= n) {
            return false;
        }
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xc0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += n + 1;
    }
    return true;
}

int vd_secret_lookup_utf8(const char *id, char **out, size_t *len, VdError **errp)
{
    uint8_t *data;
    int r = vd_object_secret_copy(id, &data, len, errp);
    if (r < 0) {
        return r;
    }
    if (!utf8_valid(data, *len) || memchr(data, 0, *len)) {
        vd_secret_free(data, *len);
        vd_error_setg(errp, EINVAL, "Data from secret %s is not valid UTF-8", id);
        return -EINVAL;
    }
    *out = (char *)data;
    return 0;
}
