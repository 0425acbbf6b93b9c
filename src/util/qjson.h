/*
 * qjson.h - JSON as QEMU prints it: a QDict's keys come out in the order of QEMU's hash buckets
 * (not insertion order), and qobject_to_json's compact form separates with ", " and ": ". The
 * offline tool's --output=json and the json: pseudo-filenames QEMU makes both depend on it.
 */
#ifndef VDISK_UTIL_QJSON_H
#define VDISK_UTIL_QJSON_H

#include <stddef.h>
#include <stdio.h>

#include <jansson.h>

/* One member of an object, in QEMU's iteration order. */
typedef struct VdQKey {
    const char *key;
    json_t *val;
    unsigned bucket; /* internal: the QDict bucket */
    int idx;         /* internal: insertion position */
} VdQKey;

/* The members of obj in the order QEMU's QDict iterates them; NULL when out of memory (or empty,
 * *n = 0). The caller frees the array; keys and values belong to obj. */
VdQKey *vd_qdict_order(json_t *obj, size_t *n);
/* A string as QEMU's JSON writer quotes it (non-ASCII as \uXXXX). */
void vd_qjson_string(FILE *f, const char *s);
/* qobject_to_json(v): the compact form, {"a": 1, "b": [1, 2]}; a new string, NULL out of memory. */
char *vd_qjson_compact(json_t *v);

#endif
