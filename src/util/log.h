/*
 * log.h - diagnostics to stderr with levels. The threshold comes from the VDISK_LOG environment
 * variable ("error", "warn", "info", "debug" or 0..3; default "warn"), read once, thread-safe.
 * Library code logs only what a user or developer needs to diagnose; errors go through VdError.
 */
#ifndef VDISK_UTIL_LOG_H
#define VDISK_UTIL_LOG_H

typedef enum {
    VD_LOG_ERROR = 0,
    VD_LOG_WARN = 1,
    VD_LOG_INFO = 2,
    VD_LOG_DEBUG = 3
} VdLogLevel;

/* Print "vdisk[level]: message\n" on stderr when level <= the configured threshold. */
void vd_log(VdLogLevel level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The same threshold, but the text as it is (no "vdisk[level]: " tag): a message whose wording a
 * QEMU peer's users match, as QEMU prints it (the text ends with its own newline). */
void vd_log_verbatim(VdLogLevel level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Would vd_log(level, ...) print anything? (avoid building expensive messages) */
int vd_log_enabled(VdLogLevel level);
/* Override the threshold (tests, -v flags). */
void vd_log_set_level(VdLogLevel level);

#endif
