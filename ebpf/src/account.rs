//! Every verdict goes through here once: drop counters, per-rule counters, the test hook.

use vpcgate_common::datapath::{
    AUDIT_OFFSET, FLAG_RECORD_LAST, LastVerdict, RuleStats, RuleStatsKey, basis,
};

use crate::{
    maps::{DROP_STATS, GEN_CONFIG, LAST_VERDICT, RULE_STATS},
    verdict::Outcome,
};

#[inline(always)]
pub fn account(o: &Outcome, bytes: u64) {
    if o.reason != 0 {
        let index = o.reason + if o.audit { AUDIT_OFFSET } else { 0 };
        if let Some(slot) = DROP_STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot; BPF programs are not preempted by others on this CPU for this map.
            unsafe { *slot += 1 };
        }
    }
    if o.basis == basis::RULE {
        let key = RuleStatsKey {
            generation: o.generation,
            rule: o.id,
        };
        match RULE_STATS.get_ptr_mut(key) {
            // SAFETY: per-CPU value.
            Some(s) => unsafe {
                (*s).packets += 1;
                (*s).bytes += bytes;
            },
            None => {
                let _ = RULE_STATS.insert(key, RuleStats { packets: 1, bytes }, 0);
            }
        }
    }
    // GEN_CONFIG[0] holds global flags.
    if let Some(cfg) = GEN_CONFIG.get(0)
        && cfg.flags & FLAG_RECORD_LAST != 0
        && let Some(last) = LAST_VERDICT.get_ptr_mut(0)
    {
        // SAFETY: test hook; tests run one packet at a time.
        unsafe {
            *last = LastVerdict {
                seq: (*last).seq + 1,
                action: o.action,
                reason: o.reason,
                basis: o.basis,
                id: o.id,
                audit: o.audit as u32,
                generation: o.generation,
            };
        }
    }
}
