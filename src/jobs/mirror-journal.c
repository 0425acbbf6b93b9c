/*
 * mirror-journal.c - what makes a live copy resumable across a vdiskd restart (docs/resumable.md):
 * the drive-mirror / blockdev-mirror request as its journal records it, and the restart that
 * re-creates every journalled copy (and stream and commit: blockops.h), PAUSED, before any
 * export serves a guest. A journal that does not resume (images gone, another size) is logged
 * and kept: nothing is deleted behind the user.
 */
#include "jobs/mirror.h"

#include <dirent.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/blockops.h"
#include "util/log.h"

/* The request's members, as the journal names them (QMP's names where QMP has one). */
typedef enum { F_STR, F_BOOL, F_INT, F_I64, F_U32 } FieldType;
typedef struct Field {
    const char *name;
    FieldType type;
    size_t at;
} Field;

#define F(n, t, m) {n, t, offsetof(MirrorRequest, m)}
static const Field fields[] = {
    F("blockdev", F_BOOL, blockdev), F("job-id", F_STR, job_id), F("device", F_STR, device),
    F("target", F_STR, target), F("format", F_STR, format), F("node-name", F_STR, node_name),
    F("sync", F_INT, sync), F("mode-existing", F_BOOL, mode_existing),
    F("mode-absolute", F_BOOL, mode_absolute), F("speed", F_I64, speed),
    F("granularity", F_U32, granularity), F("buf-size", F_I64, buf_size),
    F("on-source-error", F_INT, on_source_error), F("on-target-error", F_INT, on_target_error),
    F("unmap", F_BOOL, unmap), F("write-blocking", F_BOOL, write_blocking),
    F("auto-finalize", F_BOOL, auto_finalize), F("auto-dismiss", F_BOOL, auto_dismiss),
    F("filter-node-name", F_STR, filter_node_name), F("base-node", F_STR, base_node),
    F("x-backing-matches", F_BOOL, backing_matches), F("x-verify", F_BOOL, verify),
};
#undef F
#define NFIELDS (sizeof(fields) / sizeof(fields[0]))

json_t *mirror_request_to_json(const MirrorRequest *r)
{
    json_t *j = json_object();
    for (size_t i = 0; j && i < NFIELDS; i++) {
        const void *p = (const char *)r + fields[i].at;
        json_t *v = NULL;
        switch (fields[i].type) {
        case F_STR:
            v = *(const char *const *)p ? json_string(*(const char *const *)p) : json_null();
            break;
        case F_BOOL:
            v = json_boolean(*(const bool *)p);
            break;
        case F_INT:
            v = json_integer(*(const int *)p);
            break;
        case F_I64:
            v = json_integer(*(const int64_t *)p);
            break;
        case F_U32:
            v = json_integer(*(const uint32_t *)p);
            break;
        }
        if (json_object_set_new(j, fields[i].name, v) < 0) {
            json_decref(j);
            return NULL;
        }
    }
    return j;
}

int mirror_request_from_json(json_t *j, MirrorRequest *r, VdError **errp)
{
    memset(r, 0, sizeof(*r));
    for (size_t i = 0; i < NFIELDS; i++) {
        json_t *v = json_object_get(j, fields[i].name);
        void *p = (char *)r + fields[i].at;
        bool ok = v != NULL;
        switch (fields[i].type) {
        case F_STR:
            ok = ok && (json_is_string(v) || json_is_null(v));
            *(const char **)p = ok ? json_string_value(v) : NULL;
            break;
        case F_BOOL:
            ok = ok && json_is_boolean(v);
            *(bool *)p = ok && json_is_true(v);
            break;
        case F_INT:
            ok = ok && json_is_integer(v);
            *(int *)p = ok ? (int)json_integer_value(v) : 0;
            break;
        case F_I64:
            ok = ok && json_is_integer(v);
            *(int64_t *)p = ok ? json_integer_value(v) : 0;
            break;
        case F_U32:
            ok = ok && json_is_integer(v);
            *(uint32_t *)p = ok ? (uint32_t)json_integer_value(v) : 0;
            break;
        }
        if (!ok) {
            vd_error_setg(errp, EINVAL, "Job journal: member '%s' is missing or of the wrong type",
                          fields[i].name);
            return -EINVAL;
        }
    }
    if (!r->device || !r->target) {
        vd_error_setg(errp, EINVAL, "Job journal: no device or target");
        return -EINVAL;
    }
    /* drive-mirror created its target at the first start: now it exists. */
    r->mode_existing = true;
    return 0;
}

/* Re-create one journalled copy; the journal is the job's on success, closed (kept) otherwise. */
static int resume_one(const char *path)
{
    VdError *err = NULL;
    JobJournal *j = job_journal_open(path, &err);
    json_t *desc = j ? job_journal_desc(j) : NULL;
    json_t *req = desc ? json_object_get(desc, "request") : NULL;
    json_t *gran = desc ? json_object_get(desc, "granularity") : NULL;
    const char *type = desc ? json_string_value(json_object_get(desc, "type")) : NULL;
    MirrorRequest r;
    int rc = -EINVAL;
    if (j && type && !strcmp(type, "stream")) {
        rc = stream_resume_journal(j, &err);
    } else if (j && type && !strcmp(type, "commit")) {
        rc = commit_resume_journal(j, &err);
    } else if (j && (!type || strcmp(type, "mirror") || !json_is_integer(gran))) {
        vd_error_setg(&err, EINVAL, "not a journal of a mirror, stream or commit");
    } else if (j && mirror_request_from_json(req, &r, &err) == 0) {
        r.granularity = (uint32_t)json_integer_value(gran); /* the segment map's unit */
        r.resume = j;
        rc = mirror_request_start(&r, &err);
    }
    if (rc < 0) {
        vd_log(VD_LOG_WARN, "job journal '%s' not resumed (kept): %s", path,
               err ? vd_error_msg(err) : "unreadable");
        vd_error_free(err);
        job_journal_close(j);
        return rc;
    }
    if (!strcmp(type, "stream")) {
        /* Its map stays empty by design: the top's allocation is its progress (stream.c). */
        vd_log(VD_LOG_INFO, "job '%s' resumed from its journal, PAUSED (a stream: it skips what "
               "the top already holds)", job_journal_id(j));
        return 0;
    }
    if (job_journal_map_lost(j)) {
        vd_log(VD_LOG_WARN, "job journal '%s': no valid segment map (%s), every segment counts "
               "as marked", path, job_journal_map_lost(j));
    }
    vd_log(VD_LOG_INFO, "job '%s' resumed from its journal, PAUSED (%llu bytes to compare)",
           job_journal_id(j), (unsigned long long)job_journal_marked_bytes(j));
    return 0;
}

int mirror_resume_journals(void)
{
    const char *dir = job_journal_dir();
    DIR *d = dir ? opendir(dir) : NULL;
    if (!d) {
        return 0;
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        char *path = NULL;
        if (len <= 5 || strcmp(e->d_name + len - 5, ".json") ||
            asprintf(&path, "%s/%s", dir, e->d_name) < 0) {
            continue;
        }
        n += resume_one(path) == 0;
        free(path);
    }
    closedir(d);
    return n;
}
