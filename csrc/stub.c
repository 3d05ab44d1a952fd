/* upmig's stub: the empty shell that `upmig resume` rebuilds a process into.
 *
 * It runs none of its own code under upmig: resume makes it stop at exec
 * (PTRACE_TRACEME), then uses its first instruction, a syscall, to drive it.
 * Its registers are zero at exec, so run by hand that first syscall is a
 * harmless read(0, NULL, 0); it then explains itself and exits 2.
 * Built -nostdlib -static at an address images do not use (see Makefile). */

__asm__(
    ".globl _start\n"
    "_start:\n"
    "    syscall\n"
    "    mov $1, %eax\n"                 /* write(2, msg, len) */
    "    mov $2, %edi\n"
    "    lea msg(%rip), %rsi\n"
    "    mov $(msg_end - msg), %edx\n"
    "    syscall\n"
    "    mov $231, %eax\n"               /* exit_group(2) */
    "    mov $2, %edi\n"
    "    syscall\n"
    "msg:\n"
    "    .ascii \"upmig-stub: only `upmig resume` runs this program\\n\"\n"
    "msg_end:\n");
