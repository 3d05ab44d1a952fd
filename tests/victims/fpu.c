// fpu.c - upmig test victim: FPU/SSE/AVX register state mid-computation.
//
// One inline-asm loop keeps all its state in registers: ymm0-ymm14 accumulate
// constant 4x64-bit vectors (vpaddq, exact, upper 128 bits included), ymm15
// accumulates doubles (vaddpd of 0.5/1/2/0.25: exact), x87 st(0) counts +1.0,
// and the iteration count lives in a general register. Before READY, MXCSR is
// set to round-toward-zero + flush-to-zero and the x87 control word to 53-bit
// precision + round-down (both non-default). The loop only ends when the
// SIGTERM flag is set; then every lane must equal count * constant and the
// MXCSR / control word must still hold the non-default values.
// Uses AVX2 only (no AVX-512). No extra cflags needed: the asm is explicit.
// -DBREAK: flips one stored lane before verification -> FAIL.
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "victim.h"

#define MXCSR_VAL 0xFF80u  /* all exceptions masked, RC=toward zero, FTZ */
#define FPUCW_VAL 0x067Fu  /* all exceptions masked, PC=53 bit, RC=down */

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static uint64_t inc[15][4] __attribute__((aligned(32)));
static const double dinc[4] __attribute__((aligned(32))) = {0.5, 1.0, 2.0, 0.25};
static const double one = 1.0;
static uint64_t out[15][4] __attribute__((aligned(32)));
static double dout[4] __attribute__((aligned(32)));

#define ZERO(i) "vpxor %%xmm" #i ", %%xmm" #i ", %%xmm" #i "\n\t" /* clears all 256 bits */
#define ADD(i) "vpaddq " #i "*32(%[inc]), %%ymm" #i ", %%ymm" #i "\n\t"
#define STORE(i) "vmovdqu %%ymm" #i ", " #i "*32(%[out])\n\t"
#define ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14)

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!__builtin_cpu_supports("avx2"))
        fail("CPU has no AVX2");
    catch_sigterm(on_term);
    /* Large odd constants, so lanes wrap mod 2^64 quickly and all bits matter. */
    for (int i = 0; i < 15; i++)
        for (int l = 0; l < 4; l++)
            inc[i][l] = 0x9E3779B97F4A7C15ULL * (uint64_t)(4 * i + l + 1);

    unsigned mx = MXCSR_VAL;
    unsigned short cw = FPUCW_VAL;
    __asm__ volatile("ldmxcsr %0\n\tfldcw %1" : : "m"(mx), "m"(cw));
    printf("READY\n");

    uint64_t count = 0;
    double x87;
    __asm__ volatile(
        ALL(ZERO) ZERO(15)
        "fldz\n\t"
        "1:\n\t"
        ALL(ADD)
        "vaddpd (%[dinc]), %%ymm15, %%ymm15\n\t"
        "faddl %[one]\n\t"
        "inc %[cnt]\n\t"
        "cmpl $0, %[stop]\n\t"
        "je 1b\n\t"
        ALL(STORE)
        "vmovupd %%ymm15, (%[dout])\n\t"
        "fstpl %[x87]\n\t" /* pops st(0): x87 stack is balanced again */
        "vzeroupper\n\t"
        : [cnt] "+r"(count), [x87] "=m"(x87)
        : [inc] "r"(inc), [dinc] "r"(dinc), [out] "r"(out), [dout] "r"(dout),
          [one] "m"(one), [stop] "m"(stop)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");

    unsigned mx_now;
    unsigned short cw_now;
    __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mx_now), "=m"(cw_now));
#ifdef BREAK
    out[7][2] ^= 1;
#endif
    for (int i = 0; i < 15; i++)
        for (int l = 0; l < 4; l++)
            if (out[i][l] != count * inc[i][l])
                fail("ymm%d lane %d is %#llx, expected %#llx (count %llu)", i, l,
                     (unsigned long long)out[i][l], (unsigned long long)(count * inc[i][l]),
                     (unsigned long long)count);
    for (int l = 0; l < 4; l++) /* exact: count < 2^53 and the constants are powers of 2 */
        if (dout[l] != (double)count * dinc[l])
            fail("ymm15 lane %d is %.17g, expected %.17g", l, dout[l], (double)count * dinc[l]);
    if (x87 != (double)count)
        fail("x87 st(0) is %.17g, expected %llu", x87, (unsigned long long)count);
    if ((mx_now & 0xFFC0u) != MXCSR_VAL) /* ignore the sticky exception flags */
        fail("MXCSR is %#x, expected %#x", mx_now, MXCSR_VAL);
    if (cw_now != FPUCW_VAL)
        fail("x87 control word is %#x, expected %#x", cw_now, FPUCW_VAL);
    printf("PASS\n");
    return 0;
}
