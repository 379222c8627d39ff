//! Linux 6.1's control-flow check, replayed on the embedded kernel object without loading it.
//!
//! Before it verifies anything, 6.1's verifier (`check_cfg` in kernel/bpf/verifier.c, via `visit_insn` and
//! `push_insn`) walks each program depth first. The edge of a fall-through (any instruction that is not a jump)
//! and the edge from a call to the instruction after it reach `push_insn` with `loop_ok = false`; if such an edge
//! lands on an instruction still on the walk's stack, 6.1 refuses the whole program with "back-edge from insn X
//! to Y". Only jumps (`ja` and conditional jumps) may close a loop there. Newer kernels, this host's among them,
//! accept such layouts, so only a 6.1 VM (`cargo xtask integration-test --vm`, minutes under TCG) would otherwise
//! notice when LLVM lays a loop out with its latch falling through into its header.
//!
//! That layout is what LLVM's block placement produces, and what `-Clink-arg=--llvm-args=-disable-block-placement`
//! prevents. The flag is passed in one place only, the kernel build's `CARGO_ENCODED_RUSTFLAGS` in
//! agent/build.rs: a build of `ebpf/` that bypasses it (or an object given through `VPCGATE_EBPF_OBJ` that was
//! built without it) is what this test is here to catch.

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind, read::elf::ElfFile64};
use vpcgate::datapath::EBPF_OBJECT;
use vpcgate_common::programs;

/// One BPF instruction as stored in the object: opcode, registers, 16-bit offset, 32-bit immediate.
type Insn = [u8; 8];

const BPF_JMP: u8 = 0x05;
const BPF_JMP32: u8 = 0x06;
const BPF_JA: u8 = 0x00;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
/// `BPF_LD | BPF_IMM | BPF_DW`: the only 16-byte instruction, whose second slot is its immediate's upper half.
const LD_IMM64: u8 = 0x18;

/// What 6.1's `check_cfg` would refuse in one function. Indices are into the slice given to [`refused_by_6_1`]
/// (for a section, section-relative instruction numbers).
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// An edge with `loop_ok = false` (a fall-through, or the return edge of a call) to an instruction still on
    /// the walk's stack: 6.1's "back-edge from insn {from} to {to}".
    BackEdge { from: usize, to: usize },
    /// An edge (jump or fall-through) to outside the function: 6.1 reports "jump out of range" or, at the end of
    /// a subprogram, that its last instruction is not an exit or a jump. Calls to other functions are not edges
    /// of the function (in an unlinked object their targets are relocations anyway), so they never land here.
    LeavesFunction { from: usize, to: i64 },
    /// An instruction no path from the function's entry reaches: "unreachable insn" on every kernel.
    Unreachable { at: usize },
}

/// The edges `visit_insn` pushes from instruction `t`, as (target, `loop_ok`), in the kernel's order.
///
/// `ld_imm64` goes to `t + 2`. A `check_cfg` that predates its handling of the 16-byte width falls through into
/// the second slot and from there to `t + 2`; nothing else can reach that slot, so the answer is the same.
/// A call's only edge here is its return to `t + 1`: the callee is another function, walked on its own, which
/// matches the kernel's single walk over the linked program because no edge but a call crosses between
/// functions. Recursion, which 6.1 refuses the same way, is not looked for: in the unlinked object a
/// BPF-to-BPF call's target is a relocation, not an offset.
fn edges(insns: &[Insn], t: usize) -> Vec<(i64, bool)> {
    let [code, _regs, off_lo, off_hi, ..] = insns[t];
    let next = t as i64 + 1;
    let target = next + i64::from(i16::from_le_bytes([off_lo, off_hi]));
    if code == LD_IMM64 {
        return vec![(t as i64 + 2, false)];
    }
    if code & 0x07 != BPF_JMP && code & 0x07 != BPF_JMP32 {
        return vec![(next, false)];
    }
    match code & 0xf0 {
        BPF_EXIT => vec![],
        BPF_CALL => vec![(next, false)],
        BPF_JA => vec![(target, true)],
        // Conditional: the fall-through first, then the branch, both allowed to close a loop.
        _ => vec![(next, true), (target, true)],
    }
}

/// Replays 6.1's `check_cfg` depth-first walk over the function `insns[start..end]` from its entry `start`
/// and returns every edge and instruction it would refuse, in the order the walk meets them (the kernel stops
/// at the first). An empty answer means 6.1's CFG check accepts this function.
fn refused_by_6_1(insns: &[Insn], start: usize, end: usize) -> Vec<Refusal> {
    assert!(
        start < end && end <= insns.len(),
        "function {start}..{end} of {}",
        insns.len()
    );
    const NEW: u8 = 0;
    const ON_STACK: u8 = 1;
    const EXPLORED: u8 = 2;
    let mut state = vec![NEW; end - start];
    let mut refusals = Vec::new();
    // Each stack entry is an instruction and how many of its edges have been pushed already.
    let mut stack = vec![(start, 0)];
    state[0] = ON_STACK;
    while let Some(top) = stack.last_mut() {
        let t = top.0;
        let Some(&(to, loop_ok)) = edges(insns, t).get(top.1) else {
            state[t - start] = EXPLORED;
            stack.pop();
            continue;
        };
        top.1 += 1;
        if to < start as i64 || to >= end as i64 {
            refusals.push(Refusal::LeavesFunction { from: t, to });
            continue;
        }
        let to = to as usize;
        match state[to - start] {
            NEW => {
                state[to - start] = ON_STACK;
                stack.push((to, 0));
            }
            ON_STACK if !loop_ok => refusals.push(Refusal::BackEdge { from: t, to }),
            _ => {}
        }
    }
    let mut at = start;
    while at < end {
        if state[at - start] == NEW {
            refusals.push(Refusal::Unreachable { at });
        }
        at += if insns[at][0] == LD_IMM64 { 2 } else { 1 };
    }
    refusals
}

// Hand-built instructions for the checker's own tests.
const fn insn(code: u8, off: i16, imm: i32) -> Insn {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    [code, 0, o0, o1, i0, i1, i2, i3]
}
/// `r0 += 1` (ALU64 | ADD | K).
const ADD: Insn = insn(0x07, 0, 1);
/// `if r0 != 0 goto +off` (JMP | JNE | K).
const fn jne(off: i16) -> Insn {
    insn(0x55, off, 0)
}
/// `goto +off`.
const fn ja(off: i16) -> Insn {
    insn(BPF_JMP | BPF_JA, off, 0)
}
/// A helper call (`bpf_ktime_get_ns`).
const CALL: Insn = insn(BPF_JMP | BPF_CALL, 0, 5);
const EXIT: Insn = insn(BPF_JMP | BPF_EXIT, 0, 0);

/// A loop closed by a conditional jump back to its header is what 6.1 accepts (as a privileged loader).
#[test]
fn a_loop_closed_by_a_conditional_back_jump_is_accepted() {
    // 0: r0 += 1   <- header
    // 1: if r0 != 0 goto 0
    // 2: exit
    let prog = [ADD, jne(-2), EXIT];
    assert_eq!(refused_by_6_1(&prog, 0, 3), vec![]);
}

/// The layout block placement produces: enter the loop by jumping to its header, with the latch laid out just
/// before the header, so the loop is closed by the latch falling through. 6.1 refuses it.
#[test]
fn a_loop_closed_by_a_fall_through_is_refused() {
    // 0: goto 2        enter at the header
    // 1: r0 += 1       latch, falls through to the header
    // 2: if r0 != 0 goto 1   header
    // 3: exit
    let prog = [ja(1), ADD, jne(-2), EXIT];
    assert_eq!(
        refused_by_6_1(&prog, 0, 4),
        vec![Refusal::BackEdge { from: 1, to: 2 }]
    );
    // The same loop with the latch ending in a helper call: the call's return edge is no more allowed to close
    // a loop than a fall-through.
    let prog = [ja(1), CALL, jne(-2), EXIT];
    assert_eq!(
        refused_by_6_1(&prog, 0, 4),
        vec![Refusal::BackEdge { from: 1, to: 2 }]
    );
}

/// `ld_imm64` takes two slots: the walk steps over the second, whose bytes are the immediate's upper half and
/// never an instruction, and a refusal names the `ld_imm64` itself.
#[test]
fn ld_imm64_is_one_instruction_of_two_slots() {
    let ld = insn(LD_IMM64, 0, 7);
    // A second slot whose bytes happen to read as `exit` (the kernel wants zeros there; the point is that the
    // walk never decodes it): read as an instruction, it would leave 2 and 3 unreachable.
    let prog = [ld, EXIT, ADD, EXIT];
    assert_eq!(refused_by_6_1(&prog, 0, 4), vec![]);
    // An ld_imm64 as the latch falling through into its loop's header: the back-edge is from its first slot.
    // 0: goto 3; 1-2: r0 = imm64; 3: if r0 != 0 goto 1; 4: exit
    let prog = [ja(2), ld, insn(0, 0, 0), jne(-3), EXIT];
    assert_eq!(
        refused_by_6_1(&prog, 0, 5),
        vec![Refusal::BackEdge { from: 1, to: 3 }]
    );
    // Cut after its first slot, it runs off the function.
    let prog = [ADD, ld];
    assert_eq!(
        refused_by_6_1(&prog, 0, 2),
        vec![Refusal::LeavesFunction { from: 1, to: 3 }]
    );
}

/// `exit` ends a path; a function whose last instruction is not an exit or a jump falls off its end, jumps
/// must stay inside it, and code no path reaches is refused.
#[test]
fn exit_ends_a_path_and_edges_stay_inside_the_function() {
    // Two functions in one section: 0..2 and 2..4; the second is checked on its own, from its entry.
    let section = [ADD, EXIT, ADD, EXIT];
    assert_eq!(refused_by_6_1(&section, 0, 2), vec![]);
    assert_eq!(refused_by_6_1(&section, 2, 4), vec![]);
    assert_eq!(
        refused_by_6_1(&section, 0, 1),
        vec![Refusal::LeavesFunction { from: 0, to: 1 }]
    );
    let section = [jne(2), EXIT, ADD, EXIT];
    assert_eq!(
        refused_by_6_1(&section, 0, 2),
        vec![Refusal::LeavesFunction { from: 0, to: 3 }]
    );
    let section = [EXIT, ADD, EXIT];
    assert_eq!(
        refused_by_6_1(&section, 0, 3),
        vec![
            Refusal::Unreachable { at: 1 },
            Refusal::Unreachable { at: 2 }
        ]
    );
    // A call to another function (here a BPF-to-BPF call whose target is left to a relocation, imm = -1) is
    // not an edge of this one.
    let pseudo_call = [BPF_JMP | BPF_CALL, 0x10, 0, 0, 0xff, 0xff, 0xff, 0xff];
    assert_eq!(refused_by_6_1(&[pseudo_call, EXIT], 0, 2), vec![]);
}

/// Every function in every executable section of the object `agent/build.rs` embedded passes 6.1's CFG check.
/// The functions are taken from the object's function symbols, which must tile each section exactly, so no
/// instruction goes unchecked.
#[test]
fn the_embedded_kernel_object_passes_the_6_1_cfg_check() {
    let file = ElfFile64::<object::LittleEndian>::parse(EBPF_OBJECT)
        .expect("the embedded object is ELF64 LE");
    let mut failures = Vec::new();
    let mut checked = Vec::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let name = section.name().expect("section name");
        let data = section.data().expect("section data");
        assert_eq!(data.len() % 8, 0, "section {name}: {} bytes", data.len());
        let insns: Vec<Insn> = data
            .chunks_exact(8)
            .map(|c| c.try_into().expect("8 bytes"))
            .collect();
        let mut functions: Vec<_> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.section_index() == Some(section.index()))
            .map(|s| {
                let symbol = s.name().expect("symbol name").to_owned();
                (s.address(), s.size(), symbol)
            })
            .collect();
        functions.sort();
        let mut covered = 0;
        for (address, size, symbol) in functions {
            assert!(
                address == covered && size > 0 && size % 8 == 0,
                "section {name}: function {symbol} at byte {address}, {size} bytes, where the previous one \
                 ended at {covered}: the function symbols must tile the section for every instruction to be checked"
            );
            covered += size;
            let (start, end) = ((address / 8) as usize, (covered / 8) as usize);
            for refusal in refused_by_6_1(&insns, start, end) {
                failures.push(format!(
                    "section {name}, function {symbol} (instructions {start}..{end}): {}",
                    match refusal {
                        Refusal::BackEdge { from, to } => format!(
                            "back-edge from insn {from} to {to} (function-relative {} to {}): a fall-through or \
                             call return closes a loop",
                            from - start,
                            to - start
                        ),
                        Refusal::LeavesFunction { from, to } =>
                            format!("edge from insn {from} to {to}, outside the function"),
                        Refusal::Unreachable { at } => format!("insn {at} is unreachable"),
                    }
                ));
            }
            checked.push(symbol);
        }
        assert_eq!(
            covered,
            data.len() as u64,
            "section {name}: its function symbols cover {covered} of its {} bytes",
            data.len()
        );
    }
    for program in [
        programs::TC_EGRESS,
        programs::XDP_INGRESS,
        programs::XDP_FORWARD,
    ] {
        assert!(
            checked.iter().any(|f| f == program),
            "program {program} is not among the checked functions {checked:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "Linux 6.1's verifier would refuse the kernel object (instruction numbers are section-relative):\n  {}\n\
         A loop laid out with its latch falling through into its header is what LLVM's block placement makes; \
         agent/build.rs (the only place the kernel build's flags are set) must pass \
         -Clink-arg=--llvm-args=-disable-block-placement.",
        failures.join("\n  ")
    );
    println!("6.1 CFG check: {} functions, none refused", checked.len());
}
