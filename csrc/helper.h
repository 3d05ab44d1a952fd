/* upmig's C helper: one kernel job per function, >= 0 on success or -errno.
 * This file is both a C header and the cffi cdef (plain prototypes only). */

struct up_range {               /* a run of address space: [start, end) */
    uint64_t start;
    uint64_t end;
    uint64_t flags;             /* PAGEMAP_SCAN categories (scan) or unused */
};

struct up_copy_stats {          /* filled by up_dump_pages */
    uint64_t bytes;             /* payload bytes written */
    uint64_t frames;            /* data frames written */
    int failed_op;              /* 0 none, 1 read target, 2 write image, 3 seal */
};

/* The image's frame format, for both sides (upmig/image.py takes it from here): a
 * head of type and length (two u32), the payload, and a tail that is the frame's
 * tag, made with a 32-byte key of the image's own. */
#define UP_FRAME_HEAD 8
#define UP_FRAME_TAIL 16
#define UP_FRAME_KEY 32
#define UP_FRAME_RECORD 1       /* the frame types */
#define UP_FRAME_DATA 2
#define UP_FRAME_TRAILER 3

/* PAGEMAP_SCAN page categories (linux/fs.h of 6.7+, absent from 6.1 headers). */
#define UP_PAGE_IS_WPALLOWED 1
#define UP_PAGE_IS_WRITTEN 2
#define UP_PAGE_IS_FILE 4
#define UP_PAGE_IS_PRESENT 8
#define UP_PAGE_IS_SWAPPED 16
#define UP_PAGE_IS_PFNZERO 32
#define UP_PAGE_IS_HUGE 64
#define UP_PAGE_IS_SOFT_DIRTY 128

/* XXH64 of buf, chained through seed (file contents' identity, object ids). */
uint64_t up_xxh64(const void *buf, size_t len, uint64_t seed);

/* ptrace(req, pid, addr, data); for PEEK* the word is stored in *out. */
long up_ptrace(long req, int pid, uint64_t addr, uint64_t data, uint64_t *out);

/* waitpid(pid, status, flags | __WALL). */
int up_waitpid(int pid, int *status, int flags);

/* PTRACE_GETREGSET/SETREGSET of note type; returns the byte count moved. */
long up_getregset(int pid, int note, void *buf, size_t len);
long up_setregset(int pid, int note, const void *buf, size_t len);

/* Run one syscall in a stopped tracee (traced with PTRACE_O_TRACESYSGOOD): set regs
 * (a struct user_regs_struct) with rip at a syscall instruction, run it between its
 * syscall-enter and syscall-exit stops, fetch rax into *ret. regs is scratch. A
 * signal that stops it meanwhile is held back and named in *held_sig; a fault of its
 * own there (an unmapped syscall instruction) is -EFAULT. */
int up_inject(int pid, void *regs, long nr, const uint64_t *args, int64_t *ret,
              int *held_sig, uint64_t *clone_msg);

/* get_robust_list of another thread: its list head and the head's length. */
int up_get_robust_list(int tid, uint64_t *head, uint64_t *len);

/* pidfd_getfd(pidfd, fd, 0): a copy, in this process, of another process's fd. */
int up_pidfd_getfd(int pidfd, int fd);

/* The bytes buffered in the pipe whose read end is fd, without consuming them
 * (tee into a pipe of our own): up to cap bytes into buf; returns the count, or
 * -EOVERFLOW if fewer than FIONREAD says are buffered could be had. */
long up_pipe_peek(int fd, void *buf, size_t cap);

/* open_by_handle_at(mount_fd, {len, type, bytes}, flags): a file from its handle. */
int up_open_by_handle(int mount_fd, int type, const void *bytes, unsigned len, int flags);

/* setns(fd, nstype). */
int up_setns(int fd, int nstype);

/* PAGEMAP_SCAN over [start, end) of an opened /proc/PID/pagemap: fills out[] with
 * ranges whose categories match; *walk_end is where the kernel stopped. */
long up_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t required,
                     uint64_t inverted, uint64_t anyof, uint64_t returned,
                     struct up_range *out, size_t max, uint64_t *walk_end);

/* The pages of runs[] that two processes hold as one physical page (the same PFN in
 * both opened /proc/PID/pagemap files, present in both: copy-on-write sharing since
 * fork), as ranges in out[] (at most max; -ENOSPC past it). Needs CAP_SYS_ADMIN. */
long up_same_pages(int pagemap_a, int pagemap_b, const struct up_range *runs, size_t nruns,
                   struct up_range *out, size_t max);

/* Copy runs[] from one process's memory to the same addresses of another; through
 * their opened /proc/PID/mem files where protections stop process_vm_readv/writev. */
long up_copy_same_addresses(int src_pid, int src_mem_fd, int dst_pid, int dst_mem_fd,
                            const struct up_range *runs, size_t nruns);

/* syscall(nr, a, b, c, d) from upmig itself, for calls Python lacks (SysV IPC);
 * its result, or -errno. */
long up_syscall4(long nr, long a, long b, long c, uint64_t d);

/* Copy the target's bytes in runs[] into out_fd as data frames of chunk (<= 4 MiB)
 * bytes, each tagged with key for its place at image offset off and on, by nthreads
 * threads (<= 8). A file is written at off (its offset left at the end); a stream
 * (a pipe or socket) gets the frames in order. Reads with process_vm_readv, or pread
 * of mem_fd (/proc/PID/mem) when mem_fd >= 0 (for unreadable mappings). */
long up_dump_pages(int pid, int mem_fd, const struct up_range *runs, size_t nruns,
                   int out_fd, uint64_t off, int stream, size_t chunk, int nthreads,
                   const uint8_t *key, struct up_copy_stats *stats);

/* Read one image from a stream (pipe or socket) into memory of our own: prefix (the
 * header, already read, and with head_in_prefix its last 8 bytes the next frame's
 * head) then frames up to the trailer's end, never past it. Frame
 * heads are checked only for type (1-3) and length (<= max_payload): tags and the
 * rest are checked by the caller. *base_out and *size_out get the mapping (free it with
 * up_unmap), *len_out the bytes in it. Returns 0, -ENODATA (the stream ended first),
 * -EINVAL (a bad frame head, ending at *len_out), -EFBIG (more than cap bytes). */
long up_read_stream(int fd, const void *prefix, size_t prefix_len, int head_in_prefix,
                    uint64_t max_payload, uint64_t cap, void **base_out, uint64_t *size_out,
                    uint64_t *len_out);
void up_unmap(void *base, uint64_t size);

/* Read the data frames owed to one pages record (runs[], in order) from a stream
 * and write their bytes straight into pid's memory, or at those offsets of the file
 * out_fd when out_fd >= 0; first_head (or NULL) is the first frame's head, already
 * read. Each frame is checked (type, length, its tag with key for its offset *off)
 * before a byte of it is written; *off moves past each frame written. Returns the
 * bytes, or -ENODATA (the stream ended), -EINVAL (not the data owed), -EBADMSG (a
 * frame that does not match its tag), -errno (*off is then the failed frame's). */
long up_fill_from_stream(int in_fd, int pid, int out_fd, const struct up_range *runs,
                         size_t nruns, const uint8_t *key, uint64_t max_payload,
                         const uint8_t *first_head, uint64_t *off);

/* Write local bytes (the concatenation of src[] ranges, addresses in this process)
 * into the target's runs dst[] (same total length), by nthreads threads:
 * process_vm_writev, or pwrite of mem_fd when mem_fd >= 0. Returns the bytes. */
long up_fill_pages(int pid, int mem_fd, const struct up_range *src, size_t nsrc,
                   const struct up_range *dst, size_t ndst, int nthreads);

/* The tag (UP_FRAME_TAIL bytes, into tag) of the frame at offset off of an image
 * whose frame key is key (UP_FRAME_KEY bytes): a GMAC of head and payload. */
int up_frame_tag(const uint8_t *key, uint64_t off, const void *head, const void *payload,
                 size_t len, uint8_t *tag);

/* Walk the frames of an image mapped at base from start: types, lengths, the
 * trailer last and at the very end; with a key (else NULL), check every frame's
 * tag too, by nthreads threads. Returns the number of frames; *bad_off gets the
 * offset of the first bad frame (-EBADMSG: tag, -ENODATA: cut short, -EINVAL: bad
 * type/length or bytes after the trailer). */
long up_verify_frames(const void *base, size_t len, size_t start, const uint8_t *key,
                      uint64_t max_payload, int nthreads, uint64_t *bad_off);

/* clone3 with extra flags (say CLONE_NEWPID) and set_tid (0: any pid); the child
 * moves pass_fd (if >= 0) to fd 3, closes the fds above, optionally calls
 * PTRACE_TRACEME, and execs path. Returns the child's pid. */
int up_spawn(int set_tid, const char *path, int traceme, uint64_t flags, int pass_fd);

/* kcmp(pid1, pid2, type, idx1, idx2). */
int up_kcmp(int pid1, int pid2, int type, uint64_t idx1, uint64_t idx2);

/* linkat(AT_FDCWD, "/proc/self/fd/FD", AT_FDCWD, path, AT_SYMLINK_FOLLOW): give a
 * name to a file opened with O_TMPFILE (no CAP_DAC_READ_SEARCH needed). */
int up_link_fd(int fd, const char *path);
