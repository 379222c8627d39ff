//! A simulated kernel for the plan's model test: the policy maps as ordered maps with longest-prefix
//! lookups per generation, `ACTIVE`, `GEN_CONFIG`, rule counters, and a trace of every operation run.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use vpcgate_common::datapath::{AddrValue, GEN_A, GEN_B, GenConfig};

use super::{
    DatapathError,
    execute::Maps,
    plan::Op,
    state::{GenState, PortKey},
};

#[derive(Clone, Debug, Default)]
pub(crate) struct Sim {
    /// `ACTIVE[0]`.
    pub active: u32,
    /// `POLICY_EPOCH[0]`.
    pub epoch: u64,
    /// Every generation byte's entries (not only the two slots: nothing else may ever appear).
    pub slots: BTreeMap<u8, GenState>,
    /// (generation, rule) pairs with a counter.
    pub counters: BTreeSet<(u8, u32)>,
    /// Every operation run, in order (barriers included).
    pub trace: Vec<Op>,
    /// Operations run so far, and the counts at which one fails (as a map syscall would).
    pub ops_run: usize,
    pub fail_ops: BTreeSet<usize>,
}

/// The longest prefix of `map` containing `dst`.
fn lpm<V: Copy>(map: &BTreeMap<IpNet, V>, dst: IpAddr) -> Option<V> {
    let width = if dst.is_ipv4() { 32 } else { 128 };
    (0..=width).rev().find_map(|len| {
        map.get(&IpNet::new(dst, len).expect("length").trunc())
            .copied()
    })
}

impl Sim {
    pub fn slot(&self, g: u8) -> GenState {
        self.slots.get(&g).cloned().unwrap_or_default()
    }

    fn slot_mut(&mut self, g: u8) -> &mut GenState {
        self.slots.entry(g).or_default()
    }

    pub fn config(&self, g: u8) -> GenConfig {
        self.slots.get(&g).map(|s| s.config).unwrap_or_default()
    }

    pub fn reserved(&self, g: u8, dst: IpAddr) -> Option<u32> {
        self.slots.get(&g).and_then(|s| lpm(&s.reserved, dst))
    }

    pub fn addr(&self, g: u8, dst: IpAddr) -> Option<AddrValue> {
        self.slots.get(&g).and_then(|s| lpm(&s.addr, dst))
    }

    pub fn port(&self, g: u8, table: u64, proto: u8, port: u16) -> Option<u32> {
        let s = self.slots.get(&g)?;
        (0..=16u8).rev().find_map(|len| {
            let mask = if len == 0 { 0 } else { u16::MAX << (16 - len) };
            let key = PortKey {
                table,
                proto,
                base: port & mask,
                len,
            };
            s.ports.get(&key).copied()
        })
    }

    /// Drops empty slots, so that two sims holding the same entries compare equal.
    pub fn normalized(&self) -> BTreeMap<u8, GenState> {
        self.slots
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(g, s)| (*g, s.clone()))
            .collect()
    }
}

impl Maps for Sim {
    fn run(&mut self, op: &Op) -> Result<(), DatapathError> {
        let n = self.ops_run;
        self.ops_run += 1;
        if self.fail_ops.contains(&n) {
            return Err(DatapathError::Injected { op: n });
        }
        self.trace.push(op.clone());
        match op {
            Op::SetConfig { generation, config } => self.slot_mut(*generation).config = *config,
            Op::PutReserved {
                generation,
                net,
                index,
            } => {
                self.slot_mut(*generation).reserved.insert(*net, *index);
            }
            Op::PutPort {
                generation,
                key,
                rule,
            } => {
                self.slot_mut(*generation).ports.insert(*key, *rule);
            }
            Op::PutAddr {
                generation,
                net,
                value,
            } => {
                self.slot_mut(*generation).addr.insert(*net, *value);
            }
            Op::DeleteAddr { generation, net } => {
                self.slot_mut(*generation).addr.remove(net);
            }
            Op::DeleteReserved { generation, net } => {
                self.slot_mut(*generation).reserved.remove(net);
            }
            Op::DeletePort { generation, key } => {
                self.slot_mut(*generation).ports.remove(key);
            }
            Op::DeleteCounters { generation, rules } => {
                self.counters
                    .retain(|(g, r)| g != generation || !rules.contains(r));
            }
            Op::PurgeCounters(generation) => self.counters.retain(|(g, _)| g != generation),
            Op::Purge(generation) => {
                self.slots.remove(generation);
                self.counters.retain(|(g, _)| g != generation);
            }
            Op::SetActive(g) => self.active = u32::from(*g),
            Op::Barrier => {}
            Op::NewEpoch => self.epoch += 1,
        }
        Ok(())
    }

    fn active(&self) -> Result<Option<u8>, DatapathError> {
        Ok([GEN_A, GEN_B]
            .into_iter()
            .find(|&g| u32::from(g) == self.active))
    }

    fn read_generation(&mut self, generation: u8) -> Result<GenState, DatapathError> {
        Ok(self.slot(generation))
    }

    fn counters(&mut self, generation: u8) -> Result<Vec<u32>, DatapathError> {
        Ok(self
            .counters
            .iter()
            .filter(|(g, _)| *g == generation)
            .map(|(_, r)| *r)
            .collect())
    }
}
