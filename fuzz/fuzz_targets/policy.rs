//! Any text through the policy parser, validator, compiler and reference verdict: no panic, and the
//! invariants `vpcgate check` relies on hold (a policy comes back only without errors; every diagnostic
//! points inside the text).
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use vpcgate::policy::{
    check_text,
    compile::Compiled,
    verdict::{FlowFacts, Fragment, IpPacket, L4, Packet, verdict},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let checked = check_text("fuzz.toml", text);
    let lines = text.split('\n').count();
    for d in &checked.diagnostics {
        assert!(d.line >= 1 && d.line <= lines.max(1), "diagnostic outside the text: {d}");
        assert!(d.column >= 1);
    }
    match &checked.policy {
        None => assert!(checked.errors() > 0, "no policy and no error"),
        Some(p) => {
            assert_eq!(checked.errors(), 0);
            let c = Compiled::new(p);
            for r in &c.rules {
                let dst = r.prefix.addr();
                let src: IpAddr = if dst.is_ipv4() { [10, 0, 0, 1].into() } else { [0xfd00, 0, 0, 0, 0, 0, 0, 1].into() };
                for l4 in [L4::Tcp { dport: 80 }, L4::Udp { dport: 65535 }, L4::Icmp { kind: 8, code: 0 }, L4::Other { proto: 47 }] {
                    let pkt = Packet::Ip(IpPacket::new(src, dst, l4, Fragment::None));
                    let v = verdict(&c, &pkt, FlowFacts::default());
                    if let Some(id) = v.rule() {
                        assert!(c.rule(id).is_some(), "verdict names rule {id}, which does not exist");
                    }
                }
            }
        }
    }
});
