/*
 * qjson.c - QEMU's JSON key order and writer (see qjson.h). The order: QDict hashes each key into
 * one of 512 buckets (tdb_hash), iterates the buckets in turn, and inside a bucket returns the
 * most recently inserted key first.
 */
#include <stdlib.h>
#include <string.h>

#include "util/qjson.h"

static unsigned qdict_bucket(const char *name)
{
    unsigned value = 0x238F13AF * (unsigned)strlen(name);
    for (unsigned i = 0; name[i]; i++) {
        value = value + (((unsigned)(unsigned char)name[i]) << (i * 5 % 24));
    }
    return (1103515243 * value + 12345) % 512;
}

static int qkey_cmp(const void *a, const void *b)
{
    const VdQKey *x = a, *y = b;
    if (x->bucket != y->bucket) {
        return x->bucket < y->bucket ? -1 : 1;
    }
    return y->idx - x->idx;
}

VdQKey *vd_qdict_order(json_t *obj, size_t *n)
{
    size_t cnt = json_object_size(obj);
    VdQKey *ents = calloc(cnt ? cnt : 1, sizeof(*ents));
    *n = 0;
    if (!ents) {
        return NULL;
    }
    const char *key;
    json_t *val;
    size_t i = 0;
    json_object_foreach(obj, key, val) {
        ents[i] = (VdQKey){ .key = key, .val = val, .bucket = qdict_bucket(key), .idx = (int)i };
        i++;
    }
    qsort(ents, i, sizeof(*ents), qkey_cmp);
    *n = i;
    return ents;
}

void vd_qjson_string(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    fputc('"', f);
    while (*p) {
        unsigned cp = *p;
        int extra = 0;
        if (cp >= 0x80) {
            if ((cp & 0xE0) == 0xC0) { cp &= 0x1F; extra = 1; }
            else if ((cp & 0xF0) == 0xE0) { cp &= 0x0F; extra = 2; }
            else if ((cp & 0xF8) == 0xF0) { cp &= 0x07; extra = 3; }
            else { cp = 0xFFFD; }
            p++;
            for (int i = 0; i < extra; i++) {
                if ((*p & 0xC0) != 0x80) {
                    cp = 0xFFFD;
                    break;
                }
                cp = (cp << 6) | (*p++ & 0x3F);
            }
        } else {
            p++;
        }
        switch (cp) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (cp < 0x20 || cp >= 0x7F) {
                if (cp >= 0x10000) {
                    cp -= 0x10000;
                    fprintf(f, "\\u%04X\\u%04X", 0xD800 | (cp >> 10), 0xDC00 | (cp & 0x3FF));
                } else {
                    fprintf(f, "\\u%04X", cp);
                }
            } else {
                fputc((int)cp, f);
            }
        }
    }
    fputc('"', f);
}

static int compact_value(FILE *f, json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t n;
        VdQKey *ents = vd_qdict_order(v, &n);
        if (!ents) {
            return -1;
        }
        fputc('{', f);
        for (size_t i = 0; i < n; i++) {
            fputs(i ? ", " : "", f);
            vd_qjson_string(f, ents[i].key);
            fputs(": ", f);
            if (compact_value(f, ents[i].val) < 0) {
                free(ents);
                return -1;
            }
        }
        fputc('}', f);
        free(ents);
        return 0;
    }
    case JSON_ARRAY: {
        size_t i;
        json_t *e;
        fputc('[', f);
        json_array_foreach(v, i, e) {
            fputs(i ? ", " : "", f);
            if (compact_value(f, e) < 0) {
                return -1;
            }
        }
        fputc(']', f);
        return 0;
    }
    case JSON_STRING: vd_qjson_string(f, json_string_value(v)); return 0;
    case JSON_INTEGER: fprintf(f, "%" JSON_INTEGER_FORMAT, json_integer_value(v)); return 0;
    case JSON_REAL: fprintf(f, "%.17g", json_real_value(v)); return 0;
    case JSON_TRUE: fputs("true", f); return 0;
    case JSON_FALSE: fputs("false", f); return 0;
    case JSON_NULL: fputs("null", f); return 0;
    }
    return 0;
}

char *vd_qjson_compact(json_t *v)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) {
        return NULL;
    }
    int r = compact_value(f, v);
    if (fclose(f) != 0 || r < 0) {
        free(buf);
        return NULL;
    }
    return buf;
}
