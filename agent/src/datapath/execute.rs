//! Runs a plan against the maps, one operation at a time, updating the record after each so that a
//! failure half-way leaves an exact account of what the kernel holds.

use super::{
    DatapathError,
    plan::Op,
    state::{GenState, Recorded, Slot},
};

/// The maps a plan runs against: the kernel's (`maps::KernelMaps`) or, in tests, a simulation.
pub(crate) trait Maps {
    /// Performs one operation. Deleting an entry that is not there succeeds. A failed operation changes
    /// nothing (every BPF map syscall is atomic), except a failed `Purge`, which may have deleted some.
    fn run(&mut self, op: &Op) -> Result<(), DatapathError>;
    /// `ACTIVE`: `GEN_A`, `GEN_B`, or None when no policy is active.
    fn active(&self) -> Result<Option<u8>, DatapathError>;
    /// Everything a generation slot holds, read back from the maps.
    fn read_generation(&mut self, generation: u8) -> Result<GenState, DatapathError>;
    /// Rule ids of the generation that have counters.
    fn counters(&mut self, generation: u8) -> Result<Vec<u32>, DatapathError>;
}

/// Where `execute` stopped.
#[derive(Debug)]
pub(crate) struct Stopped {
    /// Index of the operation that failed (it did not take effect).
    pub at: usize,
    pub error: Box<DatapathError>,
}

/// Runs `ops` in order; `fail_at` makes the operation of that index fail instead of running (tests).
/// Returns how many policy-map entries were written or deleted.
pub(crate) fn execute(
    maps: &mut impl Maps,
    recorded: &mut Recorded,
    ops: &[Op],
    fail_at: Option<usize>,
) -> Result<u32, Stopped> {
    let mut writes = 0;
    for (at, op) in ops.iter().enumerate() {
        let result = if fail_at == Some(at) {
            Err(DatapathError::Injected { op: at })
        } else {
            maps.run(op)
        };
        if let Err(error) = result {
            if let Op::Purge(g) = op {
                // Some entries may be gone, some not.
                *recorded.slot_mut(*g) = Slot::Unknown;
            }
            return Err(Stopped {
                at,
                error: Box::new(error),
            });
        }
        record(recorded, op);
        writes += u32::from(op.is_entry_write());
    }
    Ok(writes)
}

/// What `op`, done, changed in the record.
fn record(recorded: &mut Recorded, op: &Op) {
    fn known(r: &mut Recorded, generation: u8) -> Option<&mut GenState> {
        match r.slot_mut(generation) {
            Slot::Known(s) => Some(s),
            Slot::Unknown => None,
        }
    }
    match op {
        Op::SetConfig { generation, config } => {
            if let Some(s) = known(recorded, *generation) {
                s.config = *config;
            }
        }
        Op::PutReserved {
            generation,
            net,
            index,
        } => {
            if let Some(s) = known(recorded, *generation) {
                s.reserved.insert(*net, *index);
            }
        }
        Op::PutPort {
            generation,
            key,
            rule,
        } => {
            if let Some(s) = known(recorded, *generation) {
                s.ports.insert(*key, *rule);
            }
        }
        Op::PutAddr {
            generation,
            net,
            value,
        } => {
            if let Some(s) = known(recorded, *generation) {
                s.addr.insert(*net, *value);
            }
        }
        Op::DeleteAddr { generation, net } => {
            if let Some(s) = known(recorded, *generation) {
                s.addr.remove(net);
            }
        }
        Op::DeleteReserved { generation, net } => {
            if let Some(s) = known(recorded, *generation) {
                s.reserved.remove(net);
            }
        }
        Op::DeletePort { generation, key } => {
            if let Some(s) = known(recorded, *generation) {
                s.ports.remove(key);
            }
        }
        Op::Purge(g) => *recorded.slot_mut(*g) = Slot::Known(GenState::default()),
        Op::SetActive(g) => recorded.active = Some(*g),
        Op::DeleteCounters { .. } | Op::PurgeCounters(_) | Op::Barrier | Op::NewEpoch => {}
    }
}
