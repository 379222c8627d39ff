//! Applying a compiled policy (DESIGN.md "Daemon behaviour"): capacity checked, a plan computed from what
//! is recorded, executed, and on failure the previous policy kept or restored and verified.

use super::{
    Datapath, DatapathError,
    capacity::{EntryCounts, check_capacity, entry_counts},
    execute::{Maps, Stopped, execute},
    maps::{KernelMaps, read_active},
    plan::{FENCE, Op, Plan, PlanKind, generation_plan, plan, plan_in_place},
    state::{Applied, GenState, Recorded, Slot},
};
use crate::policy::compile::{Compiled, RuleId};

/// What `apply` did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    pub generation: u8,
    pub previous_generation: Option<u8>,
    pub entries: EntryCounts,
    /// Old-generation entries that could not be deleted (they are removed by the next apply).
    pub stale_entries: u32,
    /// Why, when `stale_entries` is not 0.
    pub stale_reason: Option<String>,
    /// Applied in place in the active generation (only what changed), rather than as a new generation.
    pub incremental: bool,
    /// Map entries written or deleted in the policy maps.
    pub map_writes: u32,
}

/// `apply` over any maps (the kernel's, or a simulation in tests); `fail_at` injects a failure at that
/// operation of the plan.
pub(crate) fn apply_to(
    maps: &mut impl Maps,
    recorded: &mut Recorded,
    c: &Compiled,
    fail_at: Option<usize>,
) -> Result<ApplyReport, DatapathError> {
    let entries = entry_counts(c);
    check_capacity(&entries)?;
    recorded.active = maps.active()?;
    let plan = plan(recorded, c)?;
    let report = |map_writes, stale_entries, stale_reason| ApplyReport {
        generation: plan.generation,
        previous_generation: plan.previous,
        entries: entries.clone(),
        stale_entries,
        stale_reason,
        incremental: plan.kind == PlanKind::Incremental,
        map_writes,
    };
    match execute(maps, recorded, &plan.ops, fail_at) {
        Ok(writes) => {
            recorded.applied = Some(plan.applied.clone());
            tracing::info!(
                generation = plan.generation,
                previous = ?plan.previous,
                incremental = plan.kind == PlanKind::Incremental,
                writes,
                "policy applied"
            );
            Ok(report(writes, 0, None))
        }
        Err(stopped) => match plan.flip {
            None => Err(restore_in_place(maps, recorded, &plan, c, stopped)),
            // `at == flip`: the flip itself failed (ACTIVE unchanged).
            Some(flip) if stopped.at <= flip => {
                Err(discard_generation(maps, recorded, &plan, stopped))
            }
            Some(_) => {
                // The new policy is whole and active; only the old generation's removal stopped.
                recorded.applied = Some(plan.applied.clone());
                let old = super::state::other(Some(plan.generation));
                let stale = match recorded.slot(old) {
                    Slot::Known(s) => s.entries(),
                    Slot::Unknown => maps.read_generation(old).map_or(1, |s| s.entries()),
                };
                tracing::warn!(error = %stopped.error, generation = old, stale, "old generation not fully removed; the next apply removes it");
                let writes = plan.ops[..stopped.at]
                    .iter()
                    .filter(|o| o.is_entry_write())
                    .count() as u32;
                Ok(report(
                    writes,
                    stale.max(1),
                    Some(stopped.error.to_string()),
                ))
            }
        },
    }
}

fn failed(plan: &Plan, stopped: Stopped, outcome: String) -> DatapathError {
    DatapathError::ApplyFailed {
        at: stopped.at,
        op: format!("{:?}", plan.ops[stopped.at]),
        source: stopped.error,
        outcome,
    }
}

/// A generation apply failed before the flip: the old policy never stopped deciding; remove the partial
/// generation (by iterating the maps) so that nothing of it lingers.
fn discard_generation(
    maps: &mut impl Maps,
    recorded: &mut Recorded,
    plan: &Plan,
    stopped: Stopped,
) -> DatapathError {
    let g = plan.generation;
    let cleaned = execute(maps, recorded, &[Op::Purge(g)], None)
        .map_err(|s| s.error.to_string())
        .and_then(|_| maps.read_generation(g).map_err(|e| e.to_string()))
        .and_then(|s| {
            if s.is_empty() {
                Ok(())
            } else {
                Err(format!("{} entries remain", s.entries()))
            }
        });
    let outcome = match cleaned {
        Ok(()) => "the previous policy stays active, unchanged".to_owned(),
        Err(e) => {
            *recorded.slot_mut(g) = Slot::Unknown;
            format!(
                "the previous policy stays active, unchanged; the inactive generation {g} could not be emptied ({e}) and is emptied by the next apply"
            )
        }
    };
    failed(plan, stopped, outcome)
}

/// An in-place apply failed half-way: the active generation mixes both policies. Plan from the exactly
/// recorded partial state back to the previous policy, run it, then read the maps back and compare.
fn restore_in_place(
    maps: &mut impl Maps,
    recorded: &mut Recorded,
    plan: &Plan,
    c: &Compiled,
    stopped: Stopped,
) -> DatapathError {
    let g = plan.generation;
    let previous = recorded
        .applied
        .clone()
        .expect("an in-place plan is made only over an applied policy");
    let restored = restore(
        maps,
        recorded,
        g,
        &previous.target,
        previous.identities.len(),
        c,
    );
    match restored {
        Ok(()) => {
            tracing::warn!(error = %stopped.error, generation = g, "in-place apply failed; previous policy restored and verified");
            failed(
                plan,
                stopped,
                "the previous policy was restored and verified entry by entry".to_owned(),
            )
        }
        Err(in_place) => {
            // A second way back: the previous policy written whole into the other (empty) slot and
            // flipped to; the mixed slot is then emptied by iterating the maps.
            *recorded.slot_mut(g) = Slot::Unknown;
            match restore_as_generation(maps, recorded, g, &previous) {
                Ok(next) => {
                    tracing::warn!(error = %stopped.error, restore = %in_place, generation = next, "in-place apply failed and so did undoing it in place; previous policy restored as a new generation and verified");
                    failed(
                        plan,
                        stopped,
                        format!(
                            "undoing it in place failed ({in_place}); the previous policy was restored as generation {next} and verified entry by entry"
                        ),
                    )
                }
                Err(generation) => {
                    recorded.applied = None;
                    DatapathError::RestoreFailed {
                        at: stopped.at,
                        op: format!("{:?}", plan.ops[stopped.at]),
                        apply: stopped.error,
                        restore: format!("{in_place}; then as a new generation: {generation}"),
                    }
                }
            }
        }
    }
}

/// Writes `previous` whole into the slot other than `g`, flips to it and verifies it by reading it back;
/// the generation it now is.
fn restore_as_generation(
    maps: &mut impl Maps,
    recorded: &mut Recorded,
    g: u8,
    previous: &Applied,
) -> Result<u8, String> {
    let next = super::state::other(Some(g));
    let applied = Applied {
        generation: next,
        ..previous.clone()
    };
    let plan = generation_plan(recorded, next, previous.target.clone(), applied.clone());
    let flip = plan.flip.expect("a generation plan flips");
    if let Err(s) = execute(maps, recorded, &plan.ops, None)
        && s.at <= flip
    {
        return Err(format!("step {} ({:?}): {}", s.at, plan.ops[s.at], s.error));
    }
    // Past the flip, a failure only leaves the mixed slot to be emptied by the next apply.
    verify_active(maps, next, &previous.target)?;
    recorded.applied = Some(applied);
    Ok(next)
}

/// Reads generation `g` back: it must hold exactly `target` and be the active one.
fn verify_active(maps: &mut impl Maps, g: u8, target: &GenState) -> Result<(), String> {
    let read = maps.read_generation(g).map_err(|e| e.to_string())?;
    let diff = read.differences(target, 5);
    if !diff.is_empty() {
        return Err(format!(
            "generation {g} read back differs from the previous policy: {}",
            diff.join("; ")
        ));
    }
    if maps.active().map_err(|e| e.to_string())? != Some(g) {
        return Err(format!("generation {g} is not active"));
    }
    Ok(())
}

fn restore(
    maps: &mut impl Maps,
    recorded: &mut Recorded,
    g: u8,
    target: &GenState,
    old_rules: usize,
    c: &Compiled,
) -> Result<(), String> {
    let Slot::Known(partial) = recorded.slot(g).clone() else {
        return Err(format!("generation {g} is no longer recorded exactly"));
    };
    let (old_rules, new_rules) = (old_rules as RuleId, c.rules.len() as RuleId);
    let added = (new_rules > old_rules).then(|| old_rules + 1..=new_rules);
    let ops = plan_in_place(g, &partial, target, added);
    execute(maps, recorded, &ops, None)
        .map_err(|s| format!("step {} ({:?}): {}", s.at, ops[s.at], s.error))?;
    verify_active(maps, g, target)
}

impl Datapath {
    /// Applies `c` atomically: in place in the active generation when every rule that stays keeps its id
    /// and `GEN_CONFIG` is unchanged, else as a new generation (written under the inactive slot, `ACTIVE`
    /// flipped, the old slot emptied). See `plan` for the orders and barriers that keep every packet's
    /// decision the old policy's or the new one's. On failure the previous policy stays (or is restored
    /// and verified) and the error says which; `RestoreFailed` when even that failed.
    pub fn apply(&mut self, c: &Compiled) -> Result<ApplyReport, DatapathError> {
        let fail_at = self.fail_at.take();
        // Rule ids run from 1 to the rule count: from now on the kernel may count any below this.
        if let Some(below) = &mut self.counted_below {
            *below = (*below).max(c.rules.len() as u32 + 1);
        }
        let (mut maps, recorded) = self.kernel_maps_and_record();
        let r = apply_to(&mut maps, recorded, c, fail_at);
        let folded = maps.into_folded();
        self.folded.extend(folded);
        r
    }

    /// Ends every decision the programs memoized (`plan::FENCE`), as every apply does after its last
    /// write: an agent adopting pinned maps does it first, since the one before may have stopped between
    /// a write and its epoch (killed, or an undo that failed).
    pub(crate) fn fence_memos(&mut self) -> Result<(), DatapathError> {
        let (mut maps, recorded) = self.kernel_maps_and_record();
        execute(&mut maps, recorded, &FENCE, None)
            .map(|_| ())
            .map_err(|s| *s.error)
    }

    /// The kernel maps, for one plan or read.
    fn kernel_maps(&mut self) -> KernelMaps<'_> {
        self.kernel_maps_and_record().0
    }

    /// The kernel maps and what `apply` knows of them, to execute a plan.
    fn kernel_maps_and_record(&mut self) -> (KernelMaps<'_>, &mut super::state::Recorded) {
        (
            KernelMaps::new(
                &mut self.ebpf,
                &self.barrier,
                self.epoch.as_ref(),
                self.counted_below,
            ),
            &mut self.recorded,
        )
    }

    /// Bench hook: writes a new policy epoch (`Op::NewEpoch`, without the barriers of a fence: nothing
    /// changes in the policy maps), so that every decision the programs memoized ends and the next
    /// packet toward any destination walks the policy's tries, as the first one toward it does.
    #[doc(hidden)]
    pub fn new_policy_epoch(&mut self) -> Result<(), DatapathError> {
        self.kernel_maps().run(&Op::NewEpoch)
    }

    /// Rule counters that applies deleted since the last call, read at deletion: (generation, rule id,
    /// packets and bytes). A generation flip empties the old slot's counters, an in-place apply those of
    /// the rules it removes; the caller folds them into totals so history survives reloads.
    pub fn take_folded_counters(&mut self) -> Vec<(u8, u32, vpcgate_common::datapath::RuleStats)> {
        std::mem::take(&mut self.folded)
    }

    /// Test hook: the next `apply` fails at operation `op` of its plan (as if that map syscall had failed).
    #[doc(hidden)]
    pub fn fail_next_apply_at(&mut self, op: usize) {
        self.fail_at = Some(op);
    }

    /// Everything generation `generation` holds in the policy maps, read back from the kernel.
    pub fn read_generation(&mut self, generation: u8) -> Result<GenState, DatapathError> {
        self.kernel_maps().read_generation(generation)
    }

    /// Rule ids of `generation` with a non-zero counter (or a `RULE_STATS` entry), read back from the
    /// kernel.
    pub fn counted_rules(&mut self, generation: u8) -> Result<Vec<u32>, DatapathError> {
        self.kernel_maps().counters(generation)
    }

    /// How many policy-map entries (addresses, reserved blocks, port blocks) `generation` holds, found by
    /// iterating the maps (for status and tests).
    pub fn stored_entries(&mut self, generation: u8) -> Result<u32, DatapathError> {
        Ok(self.read_generation(generation)?.entries())
    }

    /// The active generation (`GEN_A`/`GEN_B`), or None when no policy was applied.
    pub fn active_generation(&self) -> Result<Option<u8>, DatapathError> {
        read_active(&self.ebpf)
    }

    /// Waits until every BPF program run that started before this call has finished.
    pub fn barrier(&self) -> Result<(), DatapathError> {
        self.barrier.wait()
    }
}
