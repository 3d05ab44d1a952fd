// rseqcs.c - upmig test victim: a thread that spends its life inside an rseq critical
// section, on glibc's own rseq registration.
//
// The critical section is an endless loop; only an abort gets it out. The kernel
// aborts it (jumps to its abort handler) whenever the thread is preempted or takes a
// signal. A dump catches it inside the section: the resumed thread must start at the
// abort handler, as the kernel would have sent it there. Were it put back inside the
// section, it would spin forever: the kernel has cleared rseq_cs by then, so not even
// SIGTERM could abort it. On SIGTERM: the handler sets a flag, the abort handler
// returns to the C loop, which sees the flag and prints PASS.
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/rseq.h>

#include "victim.h"

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static struct rseq_cs cs __attribute__((aligned(32)));
extern char cs_start[], cs_end[], cs_abort[];
void spin_in_cs(uint64_t *rseq_cs_field, struct rseq_cs *desc);

/* rdi: &rseq->rseq_cs, rsi: the descriptor. The 4 bytes before the abort handler
 * must be the signature glibc registered (RSEQ_SIG). */
__asm__(
    ".text\n"
    ".globl spin_in_cs\n"
    "spin_in_cs:\n"
    "    movq %rsi, (%rdi)\n"
    "cs_start:\n"
    "    jmp cs_start\n"
    "cs_end:\n"
    "    .long 0x53053053\n"
    "cs_abort:\n"
    "    ret\n");

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    catch_sigterm(on_term);
    if (__rseq_size == 0)
        fail("glibc registered no rseq area for this thread");
    char *tp;
    __asm__("mov %%fs:0, %0" : "=r"(tp));   /* the thread pointer */
    struct rseq *rs = (struct rseq *)(tp + __rseq_offset);
    cs.start_ip = (uintptr_t)cs_start;
    cs.post_commit_offset = (uintptr_t)(cs_end - cs_start);
    cs.abort_ip = (uintptr_t)cs_abort;
    printf("READY\n");
    long aborts = 0;
    while (!stop) {
        spin_in_cs((uint64_t *)&rs->rseq_cs, &cs);
        aborts++;
    }
    if (aborts < 1)
        fail("never aborted");
    printf("PASS\n");
    return 0;
}
