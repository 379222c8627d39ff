//! The apply plan, as data: the ordered map operations that take the kernel from what is recorded to a
//! compiled policy. Pure: no maps, no syscalls; `execute` runs a plan, the model test checks every prefix.
//!
//! A packet reads `ACTIVE`, then `GEN_CONFIG` and `ADDR_*` of that generation, then `RESERVED_*` only when no
//! address entry matched or the entry is flagged `ADDR_RESERVED_OVERLAP`, then `PORTS` only when the entry's
//! port table is not held inline; each at most once. The orders below keep every destination's decision, at every point of a plan, the old policy's or
//! the new one's; a `Barrier` guarantees that no packet which read an entry before it still runs after it.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::RangeInclusive,
};

use ipnet::IpNet;
use vpcgate_common::datapath::{AddrValue, GenConfig};

use super::state::{
    Applied, GenState, PortKey, Recorded, Slot, desired, gen_config, identities, other, table_id,
    used_tables,
};
use crate::policy::compile::{Compiled, PortTable, RuleId};

/// One map operation. `generation` is the slot it touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    SetConfig {
        generation: u8,
        config: GenConfig,
    },
    PutReserved {
        generation: u8,
        net: IpNet,
        index: u32,
    },
    PutPort {
        generation: u8,
        key: PortKey,
        rule: RuleId,
    },
    PutAddr {
        generation: u8,
        net: IpNet,
        value: AddrValue,
    },
    DeleteAddr {
        generation: u8,
        net: IpNet,
    },
    DeleteReserved {
        generation: u8,
        net: IpNet,
    },
    DeletePort {
        generation: u8,
        key: PortKey,
    },
    /// Counters of these rule ids (rules removed from the end of the policy).
    DeleteCounters {
        generation: u8,
        rules: RangeInclusive<RuleId>,
    },
    /// Every counter of the generation, found by reading `RULE_COUNTERS` (non-zero slots) and iterating
    /// `RULE_STATS`.
    PurgeCounters(u8),
    /// Every entry of the generation, found by iterating the maps (never trusting a record), its
    /// counters, and its `GEN_CONFIG` reset: the slot is then empty.
    Purge(u8),
    SetActive(u8),
    /// Returns once every packet that started before it has finished.
    Barrier,
    /// A new `POLICY_EPOCH`: ends every decision the programs memoized (`VerdictMemo`). `sealed` fences
    /// every barrier with one on each side and puts a fence before every flip; an in-place plan ends with a
    /// fence (`FENCE`).
    NewEpoch,
}

impl Op {
    /// Whether the operation writes or deletes one policy-map entry (what `ApplyReport::map_writes` counts).
    pub fn is_entry_write(&self) -> bool {
        matches!(
            self,
            Op::PutReserved { .. }
                | Op::PutPort { .. }
                | Op::PutAddr { .. }
                | Op::DeleteAddr { .. }
                | Op::DeleteReserved { .. }
                | Op::DeletePort { .. }
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanKind {
    /// In place, in the active generation: only what differs.
    Incremental,
    /// In full under the inactive generation, then `ACTIVE` flipped, then the old generation deleted.
    Generation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub kind: PlanKind,
    /// The generation active once the plan ran.
    pub generation: u8,
    pub previous: Option<u8>,
    pub ops: Vec<Op>,
    /// Index of the `SetActive` of a generation plan: a failure before it leaves the old policy untouched.
    pub flip: Option<usize>,
    /// What the recorded policy becomes.
    pub applied: Applied,
}

/// A plan that would break the content-id invariant of port tables.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "port tables {first} and {second} have the same kernel id {id:#018x} (a 64-bit hash collision); \
     the apply is refused and nothing changed: edit a port range or rule order of either"
)]
pub struct TableCollision {
    pub id: u64,
    pub first: String,
    pub second: String,
}

/// A port table's blocks: (port base, prefix length, rule).
type Blocks = BTreeSet<(u16, u8, RuleId)>;

fn describe_blocks(blocks: &Blocks) -> String {
    let parts: Vec<String> = blocks
        .iter()
        .map(|(base, len, rule)| format!("{base}/{len}->rule {rule}"))
        .collect();
    format!("[{}]", parts.join(", "))
}

fn describe_table(t: &PortTable) -> String {
    let parts: Vec<String> = t
        .intervals
        .iter()
        .map(|(lo, hi, rule)| format!("{lo}-{hi}->rule {rule}"))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Table id -> its blocks, per slot state (a table shared by TCP and UDP has the same blocks under both).
fn tables_by_id(s: &GenState) -> BTreeMap<u64, Blocks> {
    let mut out: BTreeMap<(u64, u8), Blocks> = BTreeMap::new();
    for (k, &rule) in &s.ports {
        out.entry((k.table, k.proto))
            .or_default()
            .insert((k.base, k.len, rule));
    }
    out.into_iter().map(|((id, _), b)| (id, b)).collect()
}

/// Refuses a policy two of whose distinct port tables share an id, or (for an apply in place) one whose
/// table has the id of a different table the slot holds.
pub fn check_table_ids(c: &Compiled, current: Option<&GenState>) -> Result<(), TableCollision> {
    let mut seen: BTreeMap<u64, &PortTable> = BTreeMap::new();
    for (t, _) in used_tables(c) {
        let table = &c.port_tables[t];
        let id = table_id(table);
        if let Some(prev) = seen.insert(id, table)
            && prev != table
        {
            return Err(TableCollision {
                id,
                first: describe_table(prev),
                second: describe_table(table),
            });
        }
    }
    if let Some(current) = current {
        let old = tables_by_id(current);
        for (id, blocks) in tables_by_id(&desired(c)) {
            if let Some(o) = old.get(&id)
                && *o != blocks
            {
                return Err(TableCollision {
                    id,
                    first: describe_blocks(o),
                    second: describe_blocks(&blocks),
                });
            }
        }
    }
    Ok(())
}

/// The plan that applies `c` given what is recorded (`recorded.active` freshly read from the kernel).
///
/// In place when the active slot's content is known, every rule that stays keeps its id (compared by kind
/// and name) and the whole `GEN_CONFIG` is unchanged; otherwise as a new generation.
pub fn plan(recorded: &Recorded, c: &Compiled) -> Result<Plan, TableCollision> {
    let target = desired(c);
    let applied = |generation| Applied {
        generation,
        identities: identities(c),
        target: target.clone(),
    };
    // In place only when the other slot is known to be empty: the active slot then holds at most the
    // old and the new policy's entries at once, which the maps (twice a generation's capacity) always
    // have room for, and nothing is left to clean up after the new policy is whole. A table id that
    // collides with a different table of the current policy also takes the generation path (the
    // generation byte keeps the two apart there).
    if let Some(a) = &recorded.applied
        && recorded.active == Some(a.generation)
        && let Slot::Known(current) = recorded.slot(a.generation)
        && *recorded.slot(other(Some(a.generation))) == Slot::Known(GenState::default())
        && current.config == gen_config(c)
        && a.identities.iter().zip(identities(c)).all(|(x, y)| *x == y)
        && check_table_ids(c, Some(current)).is_ok()
    {
        let g = a.generation;
        let old_rules = a.identities.len() as RuleId;
        let new_rules = c.rules.len() as RuleId;
        let removed = (new_rules < old_rules).then(|| new_rules + 1..=old_rules);
        let ops = plan_in_place(g, current, &target, removed);
        return Ok(Plan {
            kind: PlanKind::Incremental,
            generation: g,
            previous: Some(g),
            ops,
            flip: None,
            applied: applied(g),
        });
    }
    check_table_ids(c, None)?;
    let next = other(recorded.active);
    let applied = applied(next);
    Ok(generation_plan(recorded, next, target, applied))
}

/// Writes `target` into slot `next` (purged first), flips ACTIVE to it, waits, and empties the other slot.
/// When `next` may hold leftovers a packet could still be reading (a previous apply stopped between its
/// flip and its barrier), a barrier comes first.
pub(crate) fn generation_plan(
    recorded: &Recorded,
    next: u8,
    target: GenState,
    applied: Applied,
) -> Plan {
    let previous = recorded.active;
    let old = other(Some(next));
    let mut ops = vec![];
    if *recorded.slot(next) != Slot::Known(GenState::default()) {
        ops.push(Op::Barrier);
    }
    ops.push(Op::Purge(next));
    ops.extend(write_all(next, &target));
    ops.push(Op::SetActive(next));
    ops.push(Op::Barrier);
    ops.extend(remove_all(old, recorded.slot(old)));
    let ops = sealed(ops);
    let flip = ops.iter().position(|o| *o == Op::SetActive(next));
    Plan {
        kind: PlanKind::Generation,
        generation: next,
        previous,
        ops,
        flip,
        applied,
    }
}

/// A barrier between two new epochs: every packet that reads the second epoch started after the barrier,
/// so it sees every map write made before the fence (an RCU grace period orders memory on every
/// architecture; the epoch's own write does not order the writes before it on a weakly ordered CPU).
pub(crate) const FENCE: [Op; 3] = [Op::NewEpoch, Op::Barrier, Op::NewEpoch];

/// `ops` with every barrier fenced (`FENCE`) and a fence before every flip.
///
/// The programs memoize a destination's decision per CPU while the epoch stays (`VerdictMemo` in the
/// kernel crate). Between two barriers a packet may read any mix of the states the operations there go
/// through, which the plan's orders make the old policy's or the new one's decision; a memo is one such
/// decision, replayed, so it is allowed while its segment lasts. The epoch before the barrier ends the
/// segment's memos with it (a packet still running may memoize under that old epoch, which never comes
/// back); the one after it is the one a packet can only read once every write before the barrier is
/// visible to it, so a memo made under it is made from them. The fence before a flip does the same for
/// the flipped-to slot's earlier content: a packet that reads the new `ACTIVE` reads an epoch newer than
/// any memo of that slot, whatever an earlier apply that stopped half-way left. A plan whose last writes
/// touch the slot packets read (in place) ends with a fence too (`plan_in_place`).
pub(crate) fn sealed(ops: Vec<Op>) -> Vec<Op> {
    let mut out = Vec::with_capacity(ops.len() + 6);
    for op in ops {
        match op {
            Op::Barrier => out.extend(FENCE),
            Op::SetActive(_) => {
                out.extend(FENCE);
                out.push(op);
            }
            op => out.push(op),
        }
    }
    out
}

/// Every entry of `s`, written into an empty, inactive slot (any order: no packet reads it).
fn write_all(g: u8, s: &GenState) -> Vec<Op> {
    let mut ops = vec![Op::SetConfig {
        generation: g,
        config: s.config,
    }];
    ops.extend(s.reserved.iter().map(|(&net, &index)| Op::PutReserved {
        generation: g,
        net,
        index,
    }));
    ops.extend(s.ports.iter().map(|(&key, &rule)| Op::PutPort {
        generation: g,
        key,
        rule,
    }));
    ops.extend(s.addr.iter().map(|(&net, &value)| Op::PutAddr {
        generation: g,
        net,
        value,
    }));
    ops
}

/// Empties an inactive slot: by its recorded keys when known, else by iterating the maps.
fn remove_all(g: u8, slot: &Slot) -> Vec<Op> {
    let Slot::Known(s) = slot else {
        return vec![Op::Purge(g)];
    };
    let mut ops: Vec<Op> = s
        .addr
        .keys()
        .map(|&net| Op::DeleteAddr { generation: g, net })
        .collect();
    ops.extend(
        s.reserved
            .keys()
            .map(|&net| Op::DeleteReserved { generation: g, net }),
    );
    ops.extend(
        s.ports
            .keys()
            .map(|&key| Op::DeletePort { generation: g, key }),
    );
    ops.push(Op::PurgeCounters(g));
    if s.config != GenConfig::default() {
        ops.push(Op::SetConfig {
            generation: g,
            config: GenConfig::default(),
        });
    }
    ops
}

/// The in-place plan from `current` to `target` in the active slot `g`, in phases separated by barriers:
/// 1. reserved blocks added or re-attributed, longest prefix first (a shorter new block must not take
///    over a longer one's addresses before the longer one is there);
/// 2. port tables that are new (nothing names them yet);
/// 3. address entries: new prefixes longest first, then changed values;
/// 4. address prefixes removed, shortest first (removing a longer one first would expose an old shorter
///    one's decision);
/// 5. reserved blocks removed, shortest first;
/// 6. port blocks nothing names any more, and counters of rules removed from the end.
///
/// A packet reads its address entry, then (when there is none or it is flagged) reserved blocks, then
/// (when the entry's table is not inline) the port table it names; the barriers mean a packet that read an
/// old entry has finished before what it could read next changes. An entry's flag and inline intervals
/// are part of its value, written in one update.
pub fn plan_in_place(
    g: u8,
    current: &GenState,
    target: &GenState,
    removed_rules: Option<RangeInclusive<RuleId>>,
) -> Vec<Op> {
    let mut phases: Vec<Vec<Op>> = vec![vec![]; 6];
    if current.config != target.config {
        phases[0].push(Op::SetConfig {
            generation: g,
            config: target.config,
        });
    }
    let mut reserved: Vec<(&IpNet, &u32)> = target
        .reserved
        .iter()
        .filter(|(n, i)| current.reserved.get(n) != Some(i))
        .collect();
    reserved.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
    phases[0].extend(reserved.into_iter().map(|(&net, &index)| Op::PutReserved {
        generation: g,
        net,
        index,
    }));
    phases[1].extend(
        target
            .ports
            .iter()
            .filter(|(k, r)| current.ports.get(k) != Some(r))
            .map(|(&key, &rule)| Op::PutPort {
                generation: g,
                key,
                rule,
            }),
    );
    let mut added: Vec<(&IpNet, &AddrValue)> = target
        .addr
        .iter()
        .filter(|(n, _)| !current.addr.contains_key(n))
        .collect();
    added.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
    let changed = target
        .addr
        .iter()
        .filter(|(n, v)| current.addr.get(n).is_some_and(|c| c != *v));
    phases[2].extend(
        added
            .into_iter()
            .chain(changed)
            .map(|(&net, &value)| Op::PutAddr {
                generation: g,
                net,
                value,
            }),
    );
    let mut gone: Vec<&IpNet> = current
        .addr
        .keys()
        .filter(|n| !target.addr.contains_key(n))
        .collect();
    gone.sort_by_key(|n| n.prefix_len());
    phases[3].extend(
        gone.into_iter()
            .map(|&net| Op::DeleteAddr { generation: g, net }),
    );
    let mut gone: Vec<&IpNet> = current
        .reserved
        .keys()
        .filter(|n| !target.reserved.contains_key(n))
        .collect();
    gone.sort_by_key(|n| n.prefix_len());
    phases[4].extend(
        gone.into_iter()
            .map(|&net| Op::DeleteReserved { generation: g, net }),
    );
    phases[5].extend(
        current
            .ports
            .keys()
            .filter(|k| !target.ports.contains_key(k))
            .map(|&key| Op::DeletePort { generation: g, key }),
    );
    if let Some(rules) = removed_rules {
        phases[5].push(Op::DeleteCounters {
            generation: g,
            rules,
        });
    }
    let mut ops = vec![];
    for phase in phases.into_iter().filter(|p| !p.is_empty()) {
        if !ops.is_empty() {
            ops.push(Op::Barrier);
        }
        ops.extend(phase);
    }
    // The last phase wrote the slot packets read: a fence, so that what they memoize from now on is
    // made from all of it.
    if !ops.is_empty() {
        ops.push(Op::Barrier);
    }
    sealed(ops)
}
