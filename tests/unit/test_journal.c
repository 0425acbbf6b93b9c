/*
 * test_journal.c - the job journal (src/jobs/journal.c): what a reopened journal says after each
 * kind of change - a fresh journal marks everything, a mark is on disk when write_begin returns,
 * clears need nothing in flight and nothing started since collect, a torn newer map falls back to
 * the older one, a map of an earlier job of the same id is ignored, remove deletes both files.
 */
#include <errno.h>
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "jobs/journal.h"

#define SEG (1ULL << 20)
#define LEN (10 * SEG)

static char dir[64];
static char json_path[128], map_path[128];

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/vdisk-journal-XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(json_path, sizeof(json_path), "%s/j1.json", dir);
    snprintf(map_path, sizeof(map_path), "%s/j1.map", dir);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    unlink(json_path);
    unlink(map_path);
    rmdir(dir);
    return 0;
}

static JobJournal *create(void)
{
    json_t *desc = json_pack("{s:s}", "type", "mirror");
    JobJournal *j = NULL;
    VdError *err = NULL;
    assert_int_equal(job_journal_create(dir, "j1", desc, LEN, SEG, &j, &err), 0);
    json_decref(desc);
    assert_non_null(j);
    return j;
}

static JobJournal *reopen(void)
{
    VdError *err = NULL;
    JobJournal *j = job_journal_open(json_path, &err);
    assert_non_null(j);
    return j;
}

/* "0100..." : which segments a reopened journal marks. */
static void assert_marks(const char *want)
{
    JobJournal *j = reopen();
    char got[64] = "";
    for (uint64_t i = 0; i < job_journal_nsegments(j); i++) {
        got[i] = job_journal_marked(j, i) ? '1' : '0';
    }
    job_journal_close(j);
    assert_string_equal(got, want);
}

static bool never_dirty(void *opaque, uint64_t off, uint64_t bytes)
{
    (void)opaque;
    (void)off;
    (void)bytes;
    return false;
}

/* Dirty where opaque (a segment index + 1) says. */
static bool dirty_at(void *opaque, uint64_t off, uint64_t bytes)
{
    uint64_t seg = (uint64_t)(uintptr_t)opaque - 1;
    return off <= seg * SEG && seg * SEG < off + bytes;
}

static void clear_all(JobJournal *j)
{
    job_journal_clear_collect(j, never_dirty, NULL);
    assert_true(job_journal_clear_commit(j) >= 0);
}

static void test_segment_size_rule(void **state)
{
    (void)state;
    assert_int_equal(job_journal_segment_size(1ULL << 40, 65536), 64ULL << 20);
    assert_int_equal(job_journal_segment_size(64ULL << 20, 65536), 512ULL << 10); /* <= 1 % */
    assert_int_equal(job_journal_segment_size(1ULL << 20, 65536), 65536); /* >= granularity */
}

static void test_fresh_journal_marks_everything_and_keeps_the_description(void **state)
{
    (void)state;
    JobJournal *j = create();
    job_journal_close(j);
    assert_marks("1111111111");
    j = reopen();
    assert_string_equal(json_string_value(json_object_get(job_journal_desc(j), "type")),
                        "mirror");
    assert_int_equal(job_journal_len(j), LEN);
    assert_int_equal(job_journal_marked_bytes(j), LEN);
    job_journal_close(j);
}

static void test_mark_is_on_disk_when_write_begin_returns(void **state)
{
    (void)state;
    JobJournal *j = create();
    clear_all(j);
    assert_marks("0000000000");
    uint64_t w0 = job_journal_writes(j);
    job_journal_write_begin(j, 3 * SEG + 10, 2 * SEG); /* segments 3..5 */
    assert_int_equal(job_journal_writes(j), w0 + 1);
    assert_marks("0001110000");
    /* Marked already: no second write, however many guest writes come. */
    job_journal_write_begin(j, 4 * SEG, 4096);
    assert_int_equal(job_journal_writes(j), w0 + 1);
    job_journal_write_end(j, 4 * SEG, 4096);
    job_journal_write_end(j, 3 * SEG + 10, 2 * SEG);
    job_journal_close(j);
}

static void test_clear_needs_nothing_in_flight(void **state)
{
    (void)state;
    JobJournal *j = create();
    job_journal_write_begin(j, 1 * SEG, 4096);   /* a guest write still running in 1 */
    job_journal_copy_begin(j, 2 * SEG, SEG);     /* a copy still running in 2 */
    clear_all(j);
    assert_marks("0110000000");
    job_journal_write_end(j, 1 * SEG, 4096);
    job_journal_copy_end(j, 2 * SEG, SEG);
    clear_all(j);
    assert_marks("0000000000");
    job_journal_close(j);
}

static void test_clear_keeps_what_started_after_collect_or_is_still_dirty(void **state)
{
    (void)state;
    JobJournal *j = create();
    job_journal_clear_collect(j, dirty_at, (void *)(uintptr_t)(7 + 1)); /* 7 still dirty */
    /* between collect and commit (the destination flush): a write and a copy start and end */
    job_journal_write_begin(j, 4 * SEG, 4096);
    job_journal_write_end(j, 4 * SEG, 4096);
    job_journal_copy_begin(j, 9 * SEG, 4096);
    job_journal_copy_end(j, 9 * SEG, 4096);
    assert_true(job_journal_clear_commit(j) >= 0);
    assert_marks("0000100101");
    job_journal_close(j);
}

static void test_torn_newer_map_falls_back_to_the_older(void **state)
{
    (void)state;
    JobJournal *j = create();
    clear_all(j);                               /* map write 1: nothing marked */
    job_journal_write_begin(j, 6 * SEG, 1);     /* map write 2: 6 marked */
    job_journal_write_end(j, 6 * SEG, 1);
    job_journal_close(j);
    assert_marks("0000001000");
    /* tear write 2 (slot 0: seq 2 % 2): the older map (nothing marked) is what the file holds,
     * which is right: the write that needed the mark was never acknowledged */
    FILE *f = fopen(map_path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, 40, SEEK_SET), 0); /* the map body */
    assert_int_equal(fputc(0x5a, f), 0x5a);
    fclose(f);
    assert_marks("0000000000");
    /* both slots damaged: every segment counts as marked */
    f = fopen(map_path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, 4096 + 2, SEEK_SET), 0);
    assert_int_equal(fputc('X', f), 'X');
    fclose(f);
    assert_marks("1111111111");
}

static void test_a_new_job_of_the_same_id_ignores_the_old_map(void **state)
{
    (void)state;
    JobJournal *j = create();
    clear_all(j);
    job_journal_close(j);
    assert_marks("0000000000");
    j = create();
    job_journal_close(j);
    assert_marks("1111111111");
}

static void test_remove_deletes_both_files_and_stops_marking(void **state)
{
    (void)state;
    JobJournal *j = create();
    clear_all(j);
    job_journal_remove(j);
    struct stat st;
    assert_int_equal(stat(json_path, &st), -1);
    assert_int_equal(stat(map_path, &st), -1);
    uint64_t w = job_journal_writes(j);
    job_journal_write_begin(j, 0, 4096); /* a no-op now: returns at once, writes nothing */
    job_journal_write_end(j, 0, 4096);
    assert_int_equal(job_journal_writes(j), w);
    assert_int_equal(stat(map_path, &st), -1);
    job_journal_close(j);
}

static void test_no_state_dir_means_no_journal(void **state)
{
    (void)state;
    JobJournal *j = (JobJournal *)1;
    VdError *err = NULL;
    assert_int_equal(job_journal_set_dir(NULL, &err), 0);
    assert_int_equal(job_journal_create(NULL, "j1", NULL, LEN, SEG, &j, &err), 0);
    assert_null(j);
    /* the no-journal calls of a job without a state directory are no-ops */
    job_journal_write_begin(NULL, 0, 1);
    job_journal_write_end(NULL, 0, 1);
    assert_int_equal(job_journal_clear_commit(NULL), 0);
    assert_int_equal(job_journal_set_dir("/nonexistent/vdisk-state", &err), -EINVAL);
    vd_error_free(err);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_segment_size_rule),
        cmocka_unit_test_setup_teardown(test_fresh_journal_marks_everything_and_keeps_the_description,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_mark_is_on_disk_when_write_begin_returns, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_clear_needs_nothing_in_flight, setup, teardown),
        cmocka_unit_test_setup_teardown(
            test_clear_keeps_what_started_after_collect_or_is_still_dirty, setup, teardown),
        cmocka_unit_test_setup_teardown(test_torn_newer_map_falls_back_to_the_older, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_a_new_job_of_the_same_id_ignores_the_old_map, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_remove_deletes_both_files_and_stops_marking, setup,
                                        teardown),
        cmocka_unit_test(test_no_state_dir_means_no_journal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
