//! `vpcgate drops`: drop events from the kernel, one line each, with the rule nearest to allowing them;
//! `--kernel` adds the host's own drops of the gateway's packets (`skb:kfree_skb`), named with the
//! running kernel's reason names. Events the rate limit suppressed or the ring had no room for are
//! counted and reported, never hidden.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::Serialize;
use vpcgate_common::{
    datapath::{DropEvent, basis},
    parse_stats::Hook,
    verdict::DropReason,
};

use super::{EXIT_ERROR, EXIT_OK, Output, record, status};
use crate::{
    datapath::{
        Datapath, EventLoss, address_of, kernel_now_ns,
        ktrace::{Format, KernelDropEvent},
    },
    policy::{
        self,
        compile::Compiled,
        explain,
        model::Policy,
        verdict::{FlowFacts, Fragment, IpPacket, L4, Packet, verdict},
    },
};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    vpcgate drops                       the drop events waiting now, then the loss counters\n  \
    vpcgate drops --follow              keep printing until Ctrl-C\n  \
    vpcgate drops --kernel --for 30s    also this host's own drops of the gateway's packets, for 30 s\n  \
    vpcgate drops --follow --output json    one JSON object per line (type: drop, kernel_drop, loss)\n\n\
    Events come from the instance's ring buffer: one reader at a time (a second is refused). The kernel\n\
    emits at most 1000 events per second per CPU (bursts of 200); the rest are counted as suppressed.\n\
    --kernel attaches the skb:kfree_skb tracepoint while the command runs (no cost otherwise) and keeps\n\
    drops from or to the gateway's addresses in this network namespace: no route, neighbour failure,\n\
    netfilter, qdisc, ... with the reason names of the running kernel (from tracefs).")]
pub struct Args {
    /// Keep reading until interrupted.
    #[arg(long, conflicts_with = "for_")]
    pub follow: bool,
    /// Keep reading for this long: 10s, 500ms, 2m.
    #[arg(long = "for", id = "for_", value_name = "DURATION", value_parser = super::probe::parse_duration)]
    pub for_: Option<Duration>,
    /// Also the kernel's own drops of the gateway's packets (needs --follow or --for: they are seen live).
    #[arg(long)]
    pub kernel: bool,
    /// The instance ([instance].name); optional when only one is pinned.
    #[arg(long)]
    pub instance: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// One of vpcgate's drops, decoded.
#[derive(Clone, Debug, Serialize)]
pub struct Drop {
    /// Wall-clock time, RFC 3339 (UTC).
    pub time: String,
    pub interface: String,
    pub hook: &'static str,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub protocol: String,
    pub reason: &'static str,
    /// Audit mode passed it (a would-be drop).
    pub audit: bool,
    /// The rule nearest to allowing it, or why nothing does (as `explain` says it).
    pub detail: Option<String>,
    /// The smallest policy change that would allow it, on one line.
    pub change: Option<String>,
}

fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => format!("proto-{n}"),
    }
}

pub(super) fn interface_name(ifindex: u32) -> String {
    if ifindex == 0 {
        return "-".into();
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// RFC 3339 time of a kernel monotonic timestamp.
fn wall_time(ts_ns: u64) -> String {
    let age = Duration::from_nanos(kernel_now_ns().saturating_sub(ts_ns));
    let t = std::time::SystemTime::now() - age;
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn decode(e: &DropEvent, policy: Option<&(String, Policy, Compiled)>) -> Drop {
    let t = &e.tuple;
    let (src, dst) = (address_of(t.family, &t.src), address_of(t.family, &t.dst));
    let (sport, dport) = (u16::from_be_bytes(t.sport), u16::from_be_bytes(t.dport));
    let ports = matches!(t.proto, 6 | 17);
    let (detail, change) = match (policy, t.family) {
        (Some((path, p, c)), 4 | 6) => {
            let l4 = match t.proto {
                6 => L4::Tcp { dport },
                17 => L4::Udp { dport },
                _ if t.family == 4 => L4::Icmp { kind: 8, code: 0 },
                _ => L4::Icmpv6 { kind: 128, code: 0 },
            };
            let pkt = Packet::Ip(IpPacket::new(src, dst, l4, Fragment::None));
            let v = verdict(
                c,
                &pkt,
                FlowFacts {
                    local_origin: true,
                    ..FlowFacts::default()
                },
            );
            (
                Some(explain::detail(c, path, &pkt, &v)),
                explain::suggestion(p, c, &pkt, &v)
                    .map(|s| s.text.lines().map(str::trim).collect::<Vec<_>>().join(" ")),
            )
        }
        _ if e.basis == basis::SLOT_TAKEN => (
            Some(
                "headers not read: the run found its CPU's scratch slot taken by a run of the same hook it preempted (PREEMPT_RT); decided as malformed (fail closed)"
                    .to_owned(),
            ),
            None,
        ),
        _ => (None, None),
    };
    Drop {
        time: wall_time(e.timestamp_ns),
        interface: interface_name(e.ifindex),
        hook: match e.hook {
            h if h == Hook::TcEgress as u32 => "tc_egress",
            h if h == Hook::XdpForward as u32 => "xdp_forward",
            _ => "xdp",
        },
        src,
        dst,
        sport: ports.then_some(sport),
        dport: ports.then_some(dport),
        protocol: protocol_name(t.proto),
        reason: DropReason::from_code(e.reason).map_or("unknown", |r| r.name()),
        audit: e.audit != 0,
        detail,
        change,
    }
}

fn endpoint(a: IpAddr, port: Option<u16>) -> String {
    match port {
        Some(p) => SocketAddr::new(a, p).to_string(),
        None => a.to_string(),
    }
}

fn print_drop(d: &Drop) {
    println!(
        "{} {} {} → {} {} {}{}{}",
        d.time,
        d.interface,
        endpoint(d.src, d.sport),
        endpoint(d.dst, d.dport),
        d.protocol,
        d.reason,
        if d.audit { " (audit: passed)" } else { "" },
        d.change
            .as_ref()
            .map(|c| format!("  allow: {c}"))
            .or_else(|| d.detail.as_ref().map(|c| format!("  {c}")))
            .unwrap_or_default()
    );
}

#[derive(Serialize)]
struct KernelLine<'a> {
    time: String,
    interface: String,
    #[serde(flatten)]
    event: &'a KernelDropEvent,
}

fn print_kernel(e: &KernelDropEvent) {
    let ports = matches!(e.protocol, 6 | 17) && (e.sport != 0 || e.dport != 0);
    println!(
        "{} {} {} → {} {} kernel:{}",
        wall_time(e.timestamp_ns),
        interface_name(e.ifindex),
        endpoint(e.src, ports.then_some(e.sport)),
        endpoint(e.dst, ports.then_some(e.dport)),
        protocol_name(e.protocol),
        e.reason
    );
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
struct Losses {
    /// vpcgate's drop events.
    events: EventLoss,
    /// The kernel's own drops (with --kernel).
    kernel_events: Option<EventLoss>,
}

fn losses(dp: &Datapath, kernel: bool) -> Result<Losses, String> {
    Ok(Losses {
        events: dp.event_loss().map_err(|e| e.to_string())?,
        kernel_events: if kernel {
            Some(dp.kernel_drop_loss().map_err(|e| e.to_string())?)
        } else {
            None
        },
    })
}

fn print_losses(l: &Losses, since: &Losses) {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    println!(
        "events: {} suppressed by the rate limit, {} lost (ring full){}",
        d(l.events.suppressed, since.events.suppressed),
        d(l.events.lost, since.events.lost),
        match (l.kernel_events, since.kernel_events) {
            (Some(k), s) => {
                let s = s.unwrap_or_default();
                format!(
                    "; kernel drops: {} suppressed, {} lost",
                    d(k.suppressed, s.suppressed),
                    d(k.lost, s.lost)
                )
            }
            _ => String::new(),
        }
    );
}

pub fn run(args: &Args) -> u8 {
    let instance = match args.instance.clone().map_or_else(status::only_instance, Ok) {
        Ok(i) => i,
        Err(e) => return super::fail(args.output, "no_instance", e),
    };
    if args.kernel && !args.follow && args.for_.is_none() {
        return super::fail(
            args.output,
            "usage",
            "--kernel watches live drops: add --follow or --for 10s".into(),
        );
    }
    let _reader = match record::lock(
        &instance,
        "drops.lock",
        "another `vpcgate drops` reads instance {instance}'s events (it holds {path}): one reader at a time",
    ) {
        Ok(f) => f,
        Err(e) => return super::fail(args.output, "busy", e),
    };
    let mut dp = match Datapath::inspect(&instance) {
        Ok(dp) => dp,
        Err(e) => return super::fail(args.output, "no_instance", e.to_string()),
    };
    // The applied policy names the nearest rule; without it (agent never applied) events still print.
    let policy = std::fs::read_to_string(record::applied_path(&instance))
        .ok()
        .and_then(|text| {
            let path = record::applied_path(&instance).display().to_string();
            let c = policy::check_text(&path, &text);
            Some((path, c.policy?, c.compiled?))
        });
    let format: Option<Format> = if args.kernel {
        match dp.attach_kernel_drops() {
            Ok(f) => Some(f),
            Err(e) => return super::fail(args.output, "kernel_trace", e.to_string()),
        }
    } else {
        None
    };
    let start_loss = match losses(&dp, args.kernel) {
        Ok(l) => l,
        Err(e) => return super::fail(args.output, "map", e),
    };
    // SAFETY: installing an async-signal-safe handler (one atomic store).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let live = args.follow || args.for_.is_some();
    let until = args.for_.map(|d| Instant::now() + d);
    let json = args.output == Output::Json;
    let (mut drops, mut kernel_drops) = (vec![], vec![]);
    let mut last_loss = start_loss;
    loop {
        let events = match dp.take_events(1024) {
            Ok(e) => e,
            Err(e) => return super::fail(args.output, "map", e.to_string()),
        };
        for e in &events {
            let d = decode(e, policy.as_ref());
            if !live && json {
                drops.push(d);
            } else if json {
                let mut v = serde_json::to_value(&d).unwrap_or_default();
                v["type"] = "drop".into();
                println!("{v}");
            } else {
                print_drop(&d);
            }
        }
        if let Some(f) = &format {
            let events = match dp.take_kernel_drops(1024) {
                Ok(e) => e,
                Err(e) => return super::fail(args.output, "map", e.to_string()),
            };
            for e in &events {
                let k = KernelDropEvent::decode(e, f);
                if json {
                    let line = KernelLine {
                        time: wall_time(k.timestamp_ns),
                        interface: interface_name(k.ifindex),
                        event: &k,
                    };
                    let mut v = serde_json::to_value(&line).unwrap_or_default();
                    v["type"] = "kernel_drop".into();
                    if live {
                        println!("{v}");
                    } else {
                        kernel_drops.push(v);
                    }
                } else {
                    print_kernel(&k);
                }
            }
        }
        if !live || STOP.load(Ordering::Relaxed) || until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        // Losses are reported as they happen.
        if let Ok(l) = losses(&dp, args.kernel)
            && l != last_loss
        {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"type": "loss", "since_start": diff(&l, &start_loss)})
                );
            } else {
                print_losses(&l, &last_loss);
            }
            last_loss = l;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = match losses(&dp, args.kernel) {
        Ok(l) => l,
        Err(e) => return super::fail(args.output, "map", e),
    };
    if json {
        if live {
            println!(
                "{}",
                serde_json::json!({"type": "loss", "since_start": diff(&end, &start_loss), "total": end})
            );
        } else {
            let body = serde_json::json!({
                "instance": instance,
                "drops": drops,
                "loss_total": end,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&body).unwrap_or_default()
            );
        }
    } else if live {
        print_losses(&end, &start_loss);
    } else {
        // A drain: the totals since the instance was loaded.
        print_losses(&end, &Losses::default());
    }
    if STOP.load(Ordering::Relaxed) && !live {
        return EXIT_ERROR;
    }
    EXIT_OK
}

fn diff(a: &Losses, b: &Losses) -> Losses {
    let d = |x: EventLoss, y: EventLoss| EventLoss {
        suppressed: x.suppressed.saturating_sub(y.suppressed),
        lost: x.lost.saturating_sub(y.lost),
    };
    Losses {
        events: d(a.events, b.events),
        kernel_events: match (a.kernel_events, b.kernel_events) {
            (Some(x), Some(y)) => Some(d(x, y)),
            (x, _) => x,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_event_names_its_rule_hint() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/policy.toml"
        ))
        .unwrap();
        let c = policy::check_text("policy.toml", &text);
        let p = (
            "policy.toml".to_owned(),
            c.policy.unwrap(),
            c.compiled.unwrap(),
        );
        let mut e = DropEvent {
            reason: DropReason::PortNotAuthorized as u32,
            tuple: vpcgate_common::datapath::Tuple {
                family: 4,
                proto: 6,
                sport: 40000u16.to_be_bytes(),
                dport: 22u16.to_be_bytes(),
                ..Default::default()
            },
            timestamp_ns: kernel_now_ns(),
            ..DropEvent::default()
        };
        e.tuple.src[..4].copy_from_slice(&[10, 0, 0, 5]);
        // 10.1.0.0/16 is accessible on 80, 443 and 8000-8100 only.
        e.tuple.dst[..4].copy_from_slice(&[10, 1, 0, 9]);
        let d = decode(&e, Some(&p));
        assert_eq!(
            (d.reason, d.protocol.as_str(), d.dport),
            ("port_not_authorized", "tcp", Some(22))
        );
        assert_eq!(d.dst, "10.1.0.9".parse::<IpAddr>().unwrap());
        assert!(d.detail.is_some());
        let change = d.change.expect("a change allows it");
        assert!(change.contains("22"), "{change}");
        assert!(!change.contains('\n'));
        assert!(d.time.ends_with('Z') && d.time.len() == 24, "{}", d.time);
    }

    #[test]
    fn a_drop_whose_headers_were_never_read_says_so() {
        let e = DropEvent {
            reason: DropReason::Malformed as u32,
            basis: basis::SLOT_TAKEN,
            timestamp_ns: kernel_now_ns(),
            ..DropEvent::default()
        };
        let d = decode(&e, None);
        assert_eq!((d.reason, d.sport, d.dport), ("malformed", None, None));
        let detail = d.detail.expect("a slot-taken drop is explained");
        assert!(detail.contains("scratch slot taken"), "{detail}");
        assert_eq!(d.change, None);
        // Another malformed drop without addresses has no such detail.
        let other = decode(
            &DropEvent {
                basis: basis::MALFORMED,
                ..e
            },
            None,
        );
        assert_eq!(other.detail, None);
    }

    #[test]
    fn wall_time_is_rfc3339() {
        let now = wall_time(kernel_now_ns());
        assert!(now.starts_with("20") && now.as_bytes()[10] == b'T', "{now}");
    }
}
