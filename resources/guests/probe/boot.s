# Ledge probe guest: everything that runs in ring 0 (AT&T syntax, included by main.rs
# through global_asm!).
#
# Under kvm-pvm every ring-0 instruction is emulated (slowly, and not all of them), so
# ring 0 only does what the CPU will not let ring 3 do: paging, long mode, GDT/TSS/IDT,
# then iretq to CPL 3 with IOPL=3 and IF=0 (port I/O still goes through the gates below:
# kvm-pvm ignores IOPL for ring 3). Plain integer instructions only here: no
# SSE, no XSAVE/XRSTOR, no INT3, no POPCNT. The IDT entries themselves are written by
# ring-3 Rust (probe_main, at native speed) before anything can trap.
#
# Ordering: the BSP fills the TSS descriptor and the page tables before it loads CR3 and
# the GDT; the AP path reuses both and must therefore only start after the BSP is in
# ring 3 (it is: the APs are started by ring-3 Rust).

    .set SEL_KCODE,  0x08          # ring-0 64-bit code
    .set SEL_KDATA,  0x10          # ring-0 data (flat, also used in 32-bit mode)
    .set SEL_UDATA,  0x1b          # ring-3 data, RPL 3
    .set SEL_UCODE,  0x23          # ring-3 64-bit code, RPL 3
    .set SEL_TSS,    0x28          # 16-byte 64-bit TSS descriptor
    .set SEL_KCODE32, 0x38         # ring-0 32-bit code (AP trampoline only)
    .set USER_RFLAGS, 0x3002       # IOPL=3, IF=0, reserved bit 1
    .set CR4_BITS,   0x620         # PAE | OSFXSR | OSXMMEXCPT (no OSXSAVE)
    .set CR0_BITS,   0x80000023    # PG | NE | MP | PE (EM=0, TS=0)
    .set MSR_EFER,   0xc0000080
    .set EFER_LME,   0x100
    .set PTE_USER_RW, 0x7          # present | writable | user
    .set PDE_2M,     0x87          # present | writable | user | 2 MiB page

# --- PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen" -----------------------
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                        # namesz
    .long 8                        # descsz (a 64-bit field, as Linux does)
    .long 18                       # type
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

# --- BSP: 32-bit protected mode, paging off, %ebx = hvm_start_info --------------------
    .section .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, boot_start_info

    # TSS descriptor: limit 103, type 0x89 (available 64-bit TSS), base = tss.
    movl $tss, %eax
    movw $103, gdt_tss
    movw %ax, gdt_tss + 2
    shrl $16, %eax
    movb %al, gdt_tss + 4
    movb $0x89, gdt_tss + 5
    movb %ah, gdt_tss + 7

    # Identity map 0-4 GiB with 2 MiB user pages: PML4[0] -> PDPT, PDPT[0..3] -> PD0..3.
    # Guest RAM is not assumed to be zero, so PML4 and PDPT are cleared first.
    movl $pml4, %edi
    xorl %eax, %eax
    movl $2048, %ecx               # PML4 + PDPT, in dwords
    rep stosl
    movl $pdpt + PTE_USER_RW, pml4
    movl $pdpt, %edi
    movl $pd + PTE_USER_RW, %eax
    movl $4, %ecx
1:  movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    decl %ecx
    jnz 1b
    movl $pd, %edi
    movl $PDE_2M, %eax
    movl $2048, %ecx
2:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 2b

    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    lgdt gdtr
    ljmp $SEL_KCODE, $bsp_long64

    .code64
bsp_long64:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $ring0_stack_top, %esp
    movl $SEL_TSS, %eax
    ltr %ax
    lidt idtr
    movq boot_start_info, %rdi     # first argument of probe_main
    pushq $SEL_UDATA
    pushq $user_stack_top
    pushq $USER_RFLAGS
    pushq $SEL_UCODE
    pushq $user_start
    iretq

# --- AP trampoline: copied by ring-3 Rust to a 4 KiB page below 1 MiB -----------------
# Entered in real mode at CS = page >> 4, IP = 0.
    .code16
    .globl ap_tramp_start
    .globl ap_tramp_end
ap_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_gdtr - ap_tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_start32
    .balign 4
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code32
ap_start32:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmp $SEL_KCODE, $ap_long64

    .code64
ap_long64:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    # A 64-byte ring-0 stack per initial APIC ID, only to hold the iretq frame.
    # APs load no TSS (a second ltr of the busy TSS would #GP): they never trap.
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    incl %ebx
    shll $6, %ebx
    movl $ap_stacks, %esp
    addl %ebx, %esp
    lidt idtr
    pushq $SEL_UDATA
    pushq $0
    pushq $USER_RFLAGS
    pushq $SEL_UCODE
    pushq $ap_user
    iretq

# --- Trap entry points (ring 0) -------------------------------------------------------
# Exceptions 0-31: one 16-byte stub each, so the IDT can be built from isr_stubs + 16*n.
    .macro isr_noerr vec
    .balign 16
    pushq $0
    pushq $\vec
    jmp isr_common
    .endm
    .macro isr_err vec
    .balign 16
    pushq $\vec
    jmp isr_common
    .endm

    .balign 16
    .globl isr_stubs
isr_stubs:
    isr_noerr 0
    isr_noerr 1
    isr_noerr 2
    isr_noerr 3
    isr_noerr 4
    isr_noerr 5
    .balign 16
    jmp isr_ud                     # 6: #UD, may be a ring-3 `int $0x8N` under kvm-pvm
    isr_noerr 7
    isr_err 8
    isr_noerr 9
    isr_err 10
    isr_err 11
    isr_err 12
    isr_err 13
    isr_err 14
    isr_noerr 15
    isr_noerr 16
    isr_err 17
    isr_noerr 18
    isr_noerr 19
    isr_noerr 20
    isr_err 21
    isr_noerr 22
    isr_noerr 23
    isr_noerr 24
    isr_noerr 25
    isr_noerr 26
    isr_noerr 27
    isr_noerr 28
    isr_err 29
    isr_err 30
    isr_noerr 31

# Stack: vector, error, rip, cs, rflags, rsp, ss. Report it from ring 3 (probe_fault).
isr_common:
    movq %rsp, %rdi
    pushq $SEL_UDATA
    pushq $fault_stack_top
    pushq $USER_RFLAGS
    pushq $SEL_UCODE
    pushq $probe_fault
    iretq

# kvm-pvm does not deliver a ring-3 `int $n` through the gate: it raises #UD at the int
# instruction instead. So #UD first checks for `int $0x80`..`int $0x84` (cd 8N), skips
# it and jumps to that gate with the same frame; anything else is reported as a fault.
isr_ud:
    pushq %rax                     # stack: rax, rip, cs, rflags, rsp, ss
    movq 8(%rsp), %rax
    cmpb $0xcd, (%rax)
    jne 9f
    movzbq 1(%rax), %rax
    subq $0x80, %rax
    cmpq $5, %rax
    jae 9f
    addq $2, 8(%rsp)
    movq gate_table(,%rax,8), %rax
    xchgq %rax, (%rsp)             # restore rax, leave the gate address on the stack
    ret
9:  popq %rax
    pushq $0
    pushq $6
    jmp isr_common

# int $0x80 (DPL 3): halt this vCPU for good.
    .balign 16
    .globl int_halt
int_halt:
    cli
1:  hlt
    jmp 1b

# Port I/O gates (DPL 3). kvm-pvm runs guest ring 3 with the real RFLAGS.IOPL forced to
# 0, so in/out from ring 3 raise #GP there whatever iretq loaded: all port I/O goes
# through these. Each gate is a few emulated instructions plus the exit itself.
# int $0x82: write %rcx bytes at %rsi to COM1, waiting (bounded) for LSR.THRE before
# each byte. Clobbers rax, rcx, rdx, rsi, r8.
    .balign 16
    .globl int_serial_write
int_serial_write:
1:  testq %rcx, %rcx
    jz 4f
    movl $0x3fd, %edx
    movl $100000, %r8d
2:  inb %dx, %al
    testb $0x20, %al
    jnz 3f
    decl %r8d
    jnz 2b
3:  movl $0x3f8, %edx
    movb (%rsi), %al
    outb %al, %dx
    incq %rsi
    decq %rcx
    jmp 1b
4:  iretq

# int $0x83: outb %al -> port %dx.
    .balign 16
    .globl int_outb
int_outb:
    outb %al, %dx
    iretq

# int $0x84: inb port %dx -> %al.
    .balign 16
    .globl int_inb
int_inb:
    inb %dx, %al
    iretq

# int $0x81 (DPL 3): triple fault. With a zero-limit IDT, the #GP from a non-canonical
# load cannot be delivered: #GP -> #DF -> shutdown.
    .balign 16
    .globl int_triple
int_triple:
    lidt idtr_null
    movabsq $0x8000000000000000, %rax
    movq (%rax), %rax
    ud2

# --- Ring-3 entry points --------------------------------------------------------------
user_start:
    movq %rdi, %rbx
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movq %rbx, %rdi
    call probe_main
    ud2

ap_user:
    lock incl ap_online
3:  pause
    jmp 3b

# --- Descriptor tables and boot data ----------------------------------------------------
    .section .data.boot, "aw", @progbits
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff       # 0x08 ring-0 64-bit code
    .quad 0x00cf92000000ffff       # 0x10 ring-0 data
    .quad 0x00cff2000000ffff       # 0x18 ring-3 data
    .quad 0x00affa000000ffff       # 0x20 ring-3 64-bit code
gdt_tss:
    .quad 0, 0                     # 0x28 TSS (filled by pvh_start32)
    .quad 0x00cf9a000000ffff       # 0x38 ring-0 32-bit code
gdt_end:

    .balign 8
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
idtr:
    .word 4095
    .quad idt
    .balign 8
idtr_null:
    .word 0
    .quad 0

    .balign 16
tss:
    .long 0
    .quad ring0_stack_top          # RSP0
    .fill 90, 1, 0
    .word 104                      # I/O bitmap offset: none (IOPL=3 allows all ports)

    .balign 8
gate_table:                        # int $0x80 + index, for isr_ud
    .quad int_halt, int_triple, int_serial_write, int_outb, int_inb

    .balign 8
    .globl boot_start_info
boot_start_info:
    .quad 0
    .globl ap_online
ap_online:
    .long 0

# --- Never loaded, never cleared by user_start: tables and stacks -----------------------
    .section .noinit, "aw", @nobits
    .balign 4096
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd:
    .skip 4 * 4096
    .globl idt
idt:
    .skip 4096
ap_stacks:
    .skip 256 * 64 + 64
    .balign 16
    .skip 4096
ring0_stack_top:
    .skip 8192
fault_stack_top:
    .skip 65536
user_stack_top:

    .text
