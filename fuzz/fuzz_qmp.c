/*
 * fuzz_qmp.c - libFuzzer target: the input is what a QMP client sends after negotiating,
 * fed to vdiskd's QMP server (JSON scanner, parser, dispatcher, every command's argument table
 * and handler). Inputs naming a command that opens or creates host files or sockets
 * (blockdev-add, drive-mirror, blockdev-snapshot-sync, nbd-server-*, block-export-add,
 * authz-listfile) are skipped:
 * the graph stays empty, so the other commands fail on their first lookup, after their checks.
 * Promise under test: any bytes get answers, never a crash, a hang or a sanitizer report.
 *
 * The session runs on the fuzzer's thread without a socket (qmp_session_run): each input used to
 * cost a connect, an accept, a greeting and a dozen poll/send/recv calls with a switch to the
 * server's thread and back for every answer.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/qmp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool names_host_resource(const uint8_t *data, size_t size)
{
    static const char *const words[] = {"blockdev-add", "mirror", "snapshot-sync", "nbd-server",
                                        "export-add", "quit", "listfile"};
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        if (memmem(data, size, words[i], strlen(words[i]))) {
            return true;
        }
    }
    /* JSON escapes could spell those names too: skip inputs with any. */
    return memmem(data, size, "\\u", 2) != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (names_host_resource(data, size)) {
        return -1; /* not added to the corpus */
    }
    /* the session negotiates first, as a client does, then sends the input */
    static const char neg[] = "{\"execute\":\"qmp_capabilities\"}\n";
    static char *buf;
    static size_t cap;
    size_t need = sizeof(neg) - 1 + size;
    if (need > cap) {
        free(buf);
        cap = need * 2;
        buf = malloc(cap);
        if (!buf) {
            abort();
        }
    }
    memcpy(buf, neg, sizeof(neg) - 1);
    memcpy(buf + sizeof(neg) - 1, data, size);
    VdError *err = NULL;
    if (qmp_session_run(buf, need, &err) < 0) {
        fprintf(stderr, "fuzz_qmp: %s\n", vd_error_msg(err));
        abort();
    }
    return 0;
}
