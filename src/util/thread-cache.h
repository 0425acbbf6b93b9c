/*
 * thread-cache.h - run a piece of work on a thread of its own, recycling threads: one that has
 * finished waits a few seconds for the next piece before it exits. A server whose clients connect
 * and disconnect often (nbdinfo and qemu-img open one connection per command, libvirt polls, a
 * fuzzer thousands a second) then stops creating and destroying threads per connection; with
 * ASan each creation also maps and faults in the new thread's allocator caches and stack.
 *
 * The threads are detached: the work tells its caller it is done (a flag under a lock) when it
 * must wait for it. Signal masks are those of the thread that first started each thread; any
 * thread may call.
 */
#ifndef VDISK_UTIL_THREAD_CACHE_H
#define VDISK_UTIL_THREAD_CACHE_H

/* Run fn(arg) on an idle recycled thread, or a new one: 0, or -errno when none could start. */
int vd_thread_run(void (*fn)(void *), void *arg);

/*
 * Name the calling thread (printf format, cut to the kernel's 15 characters) so top -H, perf
 * sched and gdb tell vdiskd's threads apart: "copy/0", "nbd-conn fd7", "qmp"... A recycled
 * thread takes the name of the work it runs and is "idle" between pieces.
 */
void vd_thread_name(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
