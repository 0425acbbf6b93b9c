/*
 * log.c - leveled diagnostics on stderr (see log.h). The level is read lazily from VDISK_LOG;
 * racing first calls all compute the same value, and the store is atomic, so no lock is needed.
 * Each message is formatted first and written with one fprintf so lines from threads don't mix.
 */
#include "util/log.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int log_level = -1; /* -1 = not read yet */

static int parse_level(const char *s)
{
    static const char *names[] = { "error", "warn", "info", "debug" };
    if (!s || !*s) {
        return VD_LOG_WARN;
    }
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(s, names[i])) {
            return i;
        }
    }
    if (!strcasecmp(s, "warning")) {
        return VD_LOG_WARN;
    }
    char *end;
    long v = strtol(s, &end, 10);
    if (*end == '\0' && end != s) {
        return v < 0 ? VD_LOG_ERROR : v > VD_LOG_DEBUG ? VD_LOG_DEBUG : (int)v;
    }
    return VD_LOG_WARN;
}

static int current_level(void)
{
    int lvl = __atomic_load_n(&log_level, __ATOMIC_RELAXED);
    if (lvl < 0) {
        lvl = parse_level(getenv("VDISK_LOG"));
        __atomic_store_n(&log_level, lvl, __ATOMIC_RELAXED);
    }
    return lvl;
}

int vd_log_enabled(VdLogLevel level)
{
    return (int)level <= current_level();
}

void vd_log_set_level(VdLogLevel level)
{
    __atomic_store_n(&log_level, (int)level, __ATOMIC_RELAXED);
}

static void log_msg(VdLogLevel level, bool tagged, const char *fmt, va_list ap)
{
    static const char *tags[] = { "error", "warning", "info", "debug" };
    char *msg = NULL;
    if (!vd_log_enabled(level) || vasprintf(&msg, fmt, ap) < 0) {
        return;
    }
    if (tagged) {
        fprintf(stderr, "vdisk[%s]: %s\n", tags[level <= VD_LOG_DEBUG ? level : VD_LOG_DEBUG], msg);
    } else {
        fputs(msg, stderr);
    }
    free(msg);
}

void vd_log(VdLogLevel level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_msg(level, true, fmt, ap);
    va_end(ap);
}

void vd_log_verbatim(VdLogLevel level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_msg(level, false, fmt, ap);
    va_end(ap);
}
