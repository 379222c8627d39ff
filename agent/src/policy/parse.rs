//! From TOML text to a [`Policy`]: every field checked on its own (types, syntax, ranges, canonical CIDRs),
//! every problem reported. Checks across fields live in `validate`.

use std::{collections::HashMap, net::IpAddr, ops::Range};

use ipnet::IpNet;
use toml::de::{DeTable, DeValue};

use super::{
    diag::Diags,
    model::*,
    ports::{self, PortError, PortSet},
    reserved,
    source::{Pos, Source},
    walk::{At, Fields, edit_distance, integer_value, type_name},
};

pub const MAX_NODES: usize = 200;
pub const RETRIES: std::ops::RangeInclusive<i64> = 1..=100;
pub const DEFAULT_RETRIES: u32 = 5;
pub const WEIGHTS: std::ops::RangeInclusive<i64> = 1..=100;
pub const DEFAULT_WEIGHT: u32 = 10;
/// Each `[instance] flow_timeouts` entry, in seconds: 1 s to 24 h.
pub const FLOW_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=24 * 3600;

/// IPv4-mapped IPv6 (::ffff:0:0/96): the IPv4 form, when `net` lies inside that block.
fn ipv4_form(net: &IpNet) -> Option<IpNet> {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => n
            .addr()
            .to_ipv4_mapped()
            .and_then(|a| IpNet::new(IpAddr::V4(a), n.prefix_len() - 96).ok()),
        _ => None,
    }
}

/// An IPv4-mapped IPv6 address or block is an error: the kernel sends those packets as IPv4, so neither
/// an authorization nor a reserved block would ever match them. The fix is the IPv4 form, returned.
fn mapped(d: &mut Diags, v: &At<String>, shown: &str, what: &str, net: &IpNet) -> Option<IpNet> {
    let v4 = ipv4_form(net)?;
    let written = if v4.prefix_len() == 32 {
        v4.addr().to_string()
    } else {
        v4.to_string()
    };
    d.error_fix(
        &v.span,
        format!(
            "{what} `{shown}` is an IPv4-mapped IPv6 address: the kernel sends such packets as IPv4, so it would never match"
        ),
        format!("write the IPv4 form {written}"),
    );
    Some(v4)
}

/// The dotted-quad part of `s` with leading zeros dropped, when some octet has them (`010.001.0.0/16`:
/// some tools read such octets as octal, so the block would not mean the same everywhere).
pub fn without_leading_zeros(s: &str) -> Option<String> {
    let (addr, rest) = match s.split_once('/') {
        Some((a, len)) => (a, format!("/{len}")),
        None => (s, String::new()),
    };
    let octets: Vec<&str> = addr.split('.').collect();
    if octets.len() != 4
        || !octets
            .iter()
            .all(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()))
        || !octets.iter().any(|o| o.len() > 1 && o.starts_with('0'))
    {
        return None;
    }
    // Octets that are no byte (`010.999.0.0`) are simply invalid: no plain form to suggest.
    let values: Vec<u8> = octets
        .iter()
        .map(|o| {
            let digits = o.trim_start_matches('0');
            if digits.is_empty() {
                Some(0)
            } else {
                digits.parse::<u8>().ok()
            }
        })
        .collect::<Option<_>>()?;
    let fixed: Vec<String> = values.iter().map(u8::to_string).collect();
    Some(format!("{}{rest}", fixed.join(".")))
}

/// Octets with leading zeros are an error whose fix is the plain form: the text to read on.
fn plain_octets(d: &mut Diags, v: &At<String>, what: &str) -> String {
    let s = v.value.trim();
    match without_leading_zeros(s) {
        Some(fixed) => {
            d.error_fix(
                &v.span,
                format!(
                    "{what} `{s}` has octets with leading zeros (some tools read those as octal)"
                ),
                format!("write {fixed}"),
            );
            fixed
        }
        None => s.to_owned(),
    }
}

/// Parses a CIDR (or, with `allow_address`, a bare address as a host prefix), reporting every problem.
/// Returns the block meant: as written or, after an error whose fix is one exact value (host bits set,
/// octets with leading zeros, IPv4-mapped IPv6), that value, so the checks across fields still see the
/// block (the error keeps the policy from being applied). None when there is nothing to read.
pub fn cidr(d: &mut Diags, v: &At<String>, what: &str, allow_address: bool) -> Option<IpNet> {
    let s = plain_octets(d, v, what);
    let s = s.as_str();
    if allow_address && let Ok(addr) = s.parse::<IpAddr>() {
        let net = IpNet::from(addr);
        return Some(mapped(d, v, s, what, &net).unwrap_or(net));
    }
    match s.parse::<IpNet>() {
        Ok(net) => {
            if let Some(v4) = mapped(d, v, s, what, &net.trunc()) {
                return Some(v4);
            }
            if net != net.trunc() {
                d.error_fix(
                    &v.span,
                    format!("{what} {s} has host bits set"),
                    format!("write {}", net.trunc()),
                );
            }
            Some(net.trunc())
        }
        Err(_) => {
            let example = if allow_address {
                "an address such as 10.0.3.7 or a block such as 10.0.3.0/24"
            } else {
                "a block such as 10.0.0.0/24 or fd00::/64"
            };
            d.error_fix(
                &v.span,
                format!("{what} `{s}` is not a valid CIDR block"),
                format!("write {example}"),
            );
            None
        }
    }
}

/// An address, reported like [`cidr`] and returned as meant.
fn address(d: &mut Diags, v: &At<String>, what: &str) -> Option<IpAddr> {
    let s = plain_octets(d, v, what);
    match s.parse::<IpAddr>() {
        Ok(a) => Some(mapped(d, v, &s, what, &IpNet::from(a)).map_or(a, |v4| v4.addr())),
        Err(_) => {
            d.error_fix(
                &v.span,
                format!("{what} `{s}` is not an IP address"),
                "write an address such as 10.0.3.8 or fd00::8",
            );
            None
        }
    }
}

fn one_of<T: Copy>(d: &mut Diags, v: &At<String>, what: &str, choices: &[(&str, T)]) -> Option<T> {
    match choices.iter().find(|(name, _)| *name == v.value) {
        Some((_, t)) => Some(*t),
        None => {
            let names: Vec<&str> = choices.iter().map(|c| c.0).collect();
            d.error_fix(
                &v.span,
                format!("{what} `{}` is not one of {}", v.value, names.join(", ")),
                format!("write one of: {}", names.join(", ")),
            );
            None
        }
    }
}

fn check_name(
    d: &mut Diags,
    v: &At<String>,
    what: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    charset: &str,
) -> bool {
    let n = v.value.chars().count();
    if n == 0 || n > max || !v.value.chars().all(&allowed) {
        d.error_fix(
            &v.span,
            format!(
                "{what} `{}` must be 1 to {max} characters of {charset}",
                v.value
            ),
            format!(
                "rename it, e.g. `{}`",
                suggest_name(&v.value, max, &allowed)
            ),
        );
        return false;
    }
    true
}

fn suggest_name(s: &str, max: usize, allowed: &impl Fn(char) -> bool) -> String {
    let mapped: String = s
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if allowed(c) {
                c
            } else if allowed('-') {
                '-'
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if mapped.is_empty() {
        "name".into()
    } else {
        mapped
    }
}

fn interface_name(d: &mut Diags, v: &At<String>, what: &str) -> bool {
    // Linux: IFNAMSIZ - 1 bytes, no '/', no whitespace, not "." or "..".
    let ok = !v.value.is_empty()
        && v.value.len() <= 15
        && !v.value.contains(['/', ':'])
        && !v.value.chars().any(char::is_whitespace)
        && v.value != "."
        && v.value != "..";
    if !ok {
        d.error_fix(
            &v.span,
            format!("{what} `{}` is not a valid interface name", v.value),
            "use the name `ip link` shows (at most 15 characters, no '/', ':' or spaces)",
        );
    }
    ok
}

fn ports(d: &mut Diags, f: &mut Fields, key: &'static str) -> Option<Option<PortSet>> {
    let arr = f.array(d, key)?;
    let mut ranges = vec![];
    let mut ok = true;
    for item in arr.value.iter() {
        let parsed = match item.get_ref() {
            DeValue::String(s) => PortSet::parse_item(s),
            DeValue::Integer(_) => match integer_value(d, item.get_ref(), item.span(), "a port") {
                Some(n) => PortSet::parse_item(&n.value.to_string()),
                None => {
                    ok = false;
                    continue;
                }
            },
            other => Err(PortError {
                message: format!(
                    "a port is written as \"80\" or \"8000-8100\", not {}",
                    type_name(other)
                ),
                fix: ports::SYNTAX_FIX.into(),
            }),
        };
        match parsed {
            Ok(r) => ranges.push(r),
            Err(e) => {
                d.error_fix(
                    &item.span(),
                    format!("`{key}` in {}: {}", f.what, e.message),
                    e.fix,
                );
                ok = false;
            }
        }
    }
    if arr.value.is_empty() {
        d.error_fix(
            &arr.span,
            format!("`{key}` in {} is empty: nothing would be allowed", f.what),
            format!("list ports such as [\"80\", \"8000-8100\"], or remove `{key}` to allow all"),
        );
        ok = false;
    }
    ok.then(|| Some(PortSet::from_ranges(ranges)))
}

/// Reads the `[[name]]` array of tables, calling `each` with the fields of every entry. False when some
/// entry could not be read as a table at all.
fn tables<'a, 'i>(
    d: &mut Diags,
    root: &mut Fields<'a, 'i>,
    key: &'static str,
    mut each: impl FnMut(&mut Diags, Fields<'a, 'i>, usize),
) -> bool {
    let present = root.has(key);
    let Some(arr) = root.array(d, key) else {
        return !present;
    };
    let mut all = true;
    for (i, item) in arr.value.iter().enumerate() {
        match item.get_ref() {
            DeValue::Table(t) => each(
                d,
                Fields::new(t, item.span(), format!("[[{key}]] #{}", i + 1)),
                i,
            ),
            _ => {
                all = false;
                d.error(
                    &item.span(),
                    format!("`{key}` must be written as [[{key}]] tables"),
                );
            }
        }
    }
    all
}

struct Parsed {
    instance: Option<(Instance, bool)>,
    accessible: Vec<Accessible>,
    /// Every `[[accessible]]` block could be read.
    accessible_read: bool,
    authorizations: Vec<Authorization>,
    upstreams: Vec<Upstream>,
}

/// What [`parse`] read.
pub struct Read {
    /// The policy, when the `[instance]` could be read: every entry that could be read, including those
    /// with errors (see `parse`).
    pub policy: Option<Policy>,
    /// Whether every block that decides "inside the accessible blocks" (the vSwitch block and each
    /// `[[accessible]]` block) could be read: when not, that check cannot be decided and is skipped.
    pub accessible_known: bool,
}

/// The `[instance]`, and whether its vSwitch block is known (false when `vswitch_cidr` could not be read,
/// or a vpc-integration instance has none): "inside the accessible blocks" depends on it.
///
/// A field that failed is reported and, where the checks across fields do not depend on it, replaced
/// by its value as written or its default, so those checks still run (the errors keep the policy from
/// being applied). Without a usable `name`, `kind` or `vpc_id` there is no instance to check against.
fn parse_instance(d: &mut Diags, mut f: Fields) -> Option<(Instance, bool)> {
    let mut name = f.required_string(d, "name", "\"gw-1\"");
    let kind = f.required_string(d, "kind", "\"vpc-integration\"");
    let mut vpc_id = f.required_string(d, "vpc_id", "\"vpc-...\"");
    let interface = f.required_string(d, "interface", "\"eth1\"");
    let egress_ip = f.string(d, "egress_ip");
    let vswitch = f.string(d, "vswitch_cidr");
    let zone = f.string(d, "zone");
    let reserved_cidrs = f.strings(d, "reserved_cidrs");
    let mode = f.string(d, "mode");
    let forward = f.strings(d, "forward_interfaces");
    let essentials = f.strings(d, "host_essentials");
    let timeouts = f.table(d, "flow_timeouts");
    let span = f.span.clone();
    f.finish(d);

    if let Some(n) = &mut name {
        let ok = check_name(
            d,
            n,
            "instance name",
            32,
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
            "a-z, 0-9 and -",
        );
        shorten_unless(ok, n);
    }
    let kind_v = kind.as_ref().and_then(|k| {
        one_of(
            d,
            k,
            "kind",
            &[
                ("vpc-integration", Kind::VpcIntegration),
                ("dedicated", Kind::Dedicated),
            ],
        )
    });
    if let Some(v) = &mut vpc_id {
        let ok = vpc_id_ok(d, v);
        shorten_unless(ok, v);
    }
    if let Some(i) = &interface {
        interface_name(d, i, "interface");
    }
    let egress = egress_ip.as_ref().and_then(|e| address(d, e, "egress_ip"));
    let vswitch_v = vswitch.as_ref().map(|v| cidr(d, v, "vswitch_cidr", false));
    if kind_v == Some(Kind::VpcIntegration) && vswitch.is_none() {
        d.error_fix(&span, "[instance] of kind vpc-integration has no `vswitch_cidr`", "add the vSwitch block the instance was created in, e.g. `vswitch_cidr = \"10.0.0.0/24\"`");
    }
    let vswitch_known = match vswitch_v {
        Some(v) => v.is_some(),
        None => kind_v != Some(Kind::VpcIntegration),
    };
    let mut reserved = vec![];
    if let Some(z) = &zone {
        match reserved::zone_blocks(&z.value) {
            Some(blocks) => reserved.extend(blocks.iter().map(|&cidr| Reserved {
                cidr,
                source: ReservedSource::Zone(z.value.clone()),
                pos: d.source.pos(&z.span),
            })),
            None => {
                let near = reserved::closest_zones(&z.value);
                let list = "every known zone: `vpcgate check --help`; or list the zone's blocks in reserved_cidrs";
                let fix = if near.is_empty() {
                    list.to_owned()
                } else {
                    format!("did you mean {}? {list}", near.join(", "))
                };
                d.error_fix(
                    &z.span,
                    format!(
                        "unknown zone `{}`: the built-in reserved-block table has no such zone",
                        z.value
                    ),
                    fix,
                );
            }
        }
    }
    for r in reserved_cidrs.iter().flatten() {
        if let Some(c) = cidr(d, r, "reserved block", false) {
            reserved.push(Reserved {
                cidr: c,
                source: ReservedSource::Explicit,
                pos: d.source.pos(&r.span),
            });
        }
    }
    let mode_v = mode.as_ref().and_then(|m| {
        one_of(
            d,
            m,
            "mode",
            &[("enforce", Mode::Enforce), ("audit", Mode::Audit)],
        )
    });
    for i in forward.iter().flatten() {
        interface_name(d, i, "forward interface");
    }
    // A mistake in these two is reported and replaced by the default, so the checks across fields still
    // run (the errors keep the policy from being applied).
    let host_essentials = match &essentials {
        Some(list) => host_essentials(d, list),
        None => HostEssential::ALL.to_vec(),
    };
    let flow_timeouts = timeouts.map_or_else(FlowTimeouts::default, |t| {
        flow_timeouts(d, Fields::new(t.value, t.span, "[instance] flow_timeouts"))
    });
    let instance = Instance {
        name: name?.value,
        kind: kind_v?,
        vpc_id: vpc_id?.value,
        interface: interface.map(|i| i.value).unwrap_or_default(),
        egress_ip: egress,
        egress_pos: egress_ip
            .as_ref()
            .map(|e| d.source.pos(&e.span))
            .unwrap_or_default(),
        vswitch_cidr: vswitch_v.flatten(),
        vswitch_pos: vswitch
            .as_ref()
            .map(|v| d.source.pos(&v.span))
            .unwrap_or_default(),
        zone: zone.map(|z| z.value),
        reserved,
        mode: mode_v.unwrap_or(Mode::Enforce),
        forward_interfaces: forward
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.value)
            .collect(),
        host_essentials,
        flow_timeouts,
    };
    Some((instance, vswitch_known))
}

/// `host_essentials = ["dhcp", "mld"]`: the essentials named, each once, in [`HostEssential::ALL`]'s order
/// (so `check`, `explain` and `status` list them alike).
fn host_essentials(d: &mut Diags, list: &[At<String>]) -> Vec<HostEssential> {
    let names: Vec<&str> = HostEssential::ALL.iter().map(|e| e.name()).collect();
    let mut out = vec![];
    for item in list {
        match HostEssential::ALL
            .into_iter()
            .find(|e| e.name() == item.value)
        {
            Some(e) if out.contains(&e) => d.warning_fix(
                &item.span,
                format!("host essential `{}` is listed twice", item.value),
                "remove the repeated entry",
            ),
            Some(e) => out.push(e),
            None => {
                let known = format!(
                    "known host essentials: {}; `host_essentials = []` turns them off",
                    names.join(", ")
                );
                // Short names: a prefix either way ("dhcpv6", "mldv2"), one edit away or the same
                // letters swapped ("dchp"); not the distance used for field names, which would take
                // any three letters for `mld`.
                let typed = item.value.trim().to_ascii_lowercase();
                let letters = |s: &str| {
                    let mut l: Vec<char> = s.chars().collect();
                    l.sort_unstable();
                    l
                };
                let near = HostEssential::ALL.into_iter().find(|e| {
                    !typed.is_empty()
                        && (typed.starts_with(e.name())
                            || e.name().starts_with(&typed)
                            || edit_distance(&typed, e.name()) <= 1
                            || letters(&typed) == letters(e.name()))
                });
                let fix = match near {
                    Some(e) => format!("did you mean `{}` ({})? {known}", e.name(), e.describe()),
                    None => known,
                };
                d.error_fix(
                    &item.span,
                    format!("unknown host essential `{}`", item.value),
                    fix,
                );
            }
        }
    }
    out.sort();
    out
}

/// `"90s"`, `"5m"`, `"1h"` in seconds (saturating), or None when `s` is not written so.
pub fn duration_seconds(s: &str) -> Option<u64> {
    let unit = match s.chars().last()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        _ => return None,
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: parsing fails only on overflow, which is out of range anyway.
    Some(
        digits
            .parse::<u64>()
            .unwrap_or(u64::MAX)
            .saturating_mul(unit),
    )
}

/// Seconds in the largest unit that divides them: 3600 → `1h`, 300 → `5m`, 90 → `90s`; one minute stays
/// `60s`, as the UDP default is written in the docs.
pub fn show_duration(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// One entry of `flow_timeouts`: None when absent, Err when wrong (reported).
fn flow_timeout(
    d: &mut Diags,
    f: &mut Fields,
    key: &'static str,
    default: u32,
) -> Result<Option<At<u32>>, ()> {
    let Some(v) = f.value(key) else {
        return Ok(None);
    };
    let what = format!("`{key}` in {}", f.what);
    let fix = format!(
        "write a duration from 1s to 24h with unit s, m or h, e.g. \"{}\" (the default), or a whole number of seconds",
        show_duration(default.into())
    );
    let (secs, shown) = match v.value {
        DeValue::String(s) => match duration_seconds(s.trim()) {
            Some(n) => (n, s.trim().to_owned()),
            None => {
                d.error_fix(&v.span, format!("{what}: `{s}` is not a duration"), fix);
                return Err(());
            }
        },
        DeValue::Integer(_) => {
            let n = integer_value(d, v.value, v.span.clone(), &what).ok_or(())?;
            (u64::try_from(n.value).unwrap_or(0), format!("{}s", n.value))
        }
        other => {
            d.error_fix(
                &v.span,
                format!(
                    "{what} must be a duration such as \"60s\" or a number of seconds, not {}",
                    type_name(other)
                ),
                fix,
            );
            return Err(());
        }
    };
    match u32::try_from(secs) {
        Ok(secs) if FLOW_TIMEOUT_SECONDS.contains(&secs.into()) => Ok(Some(At::new(secs, v.span))),
        _ => {
            d.error_fix(
                &v.span,
                format!("{what}: {shown} is out of range 1s..=24h"),
                fix,
            );
            Err(())
        }
    }
}

/// `flow_timeouts = { tcp = "1h", tcp_closing = "10s", udp = "60s" }`; an entry left out, or wrong
/// (reported), keeps its default.
fn flow_timeouts(d: &mut Diags, mut f: Fields) -> FlowTimeouts {
    let default = FlowTimeouts::default();
    let tcp = flow_timeout(d, &mut f, "tcp", default.tcp);
    let closing = flow_timeout(d, &mut f, "tcp_closing", default.tcp_closing);
    let udp = flow_timeout(d, &mut f, "udp", default.udp);
    let what = f.what.clone();
    f.finish(d);
    let value = |t: &Result<Option<At<u32>>, ()>, default| match t {
        Ok(Some(t)) => t.value,
        _ => default,
    };
    let out = FlowTimeouts {
        tcp: value(&tcp, default.tcp),
        tcp_closing: value(&closing, default.tcp_closing),
        udp: value(&udp, default.udp),
    };
    // Compared only when both are what the operator meant, not a default standing in for an error.
    if let (Ok(tcp), Ok(closing)) = (&tcp, &closing)
        && out.tcp_closing > out.tcp
        && let Some(at) = closing.as_ref().or(tcp.as_ref())
    {
        d.warning_fix(
            &at.span,
            format!(
                "`tcp_closing` in {} ({}) is longer than `tcp` ({}): a closing connection would outlive an idle established one",
                what,
                show_duration(out.tcp_closing.into()),
                show_duration(out.tcp.into())
            ),
            format!(
                "make tcp_closing shorter than tcp (defaults: tcp {}, tcp_closing {})",
                show_duration(default.tcp.into()),
                show_duration(default.tcp_closing.into())
            ),
        );
    }
    out
}

/// Whether `s` is written like a VPC id.
pub fn is_vpc_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An invalid name or id, already reported in full, stays in the model so that other checks still run;
/// but other messages quote it (for every node of an upstream, every backend of an instance), so it is
/// kept short there: a long invalid value must not multiply into megabytes of diagnostics.
fn shorten_unless(ok: bool, v: &mut At<String>) {
    const KEEP: usize = 64;
    if !ok && v.value.chars().count() > KEEP {
        let head: String = v.value.chars().take(KEEP).collect();
        v.value = format!("{head}…");
    }
}

fn vpc_id_ok(d: &mut Diags, v: &At<String>) -> bool {
    let ok = is_vpc_id(&v.value);
    if !ok {
        d.error_fix(
            &v.span,
            format!("vpc_id `{}` is not a VPC id", v.value),
            "copy the VPC id from the console, e.g. \"vpc-bp1example\"",
        );
    }
    ok
}

/// An `[[accessible]]` entry: None when its block could not be read. A mistake in `ports` or
/// `protocols` is reported and the entry kept with all ports and protocols: the checks across fields
/// look only at the block, and the errors keep the policy from being applied.
fn parse_accessible(d: &mut Diags, mut f: Fields) -> Option<Accessible> {
    let c = f.required_string(d, "cidr", "\"10.1.0.0/16\"");
    let ports = ports(d, &mut f, "ports");
    let protocols = f.strings(d, "protocols");
    let protocols_span = f.span_of("protocols").unwrap_or_default();
    f.finish(d);
    let cidr_v = c
        .as_ref()
        .and_then(|c| cidr(d, c, "accessible block", false));
    let protos = match &protocols {
        None => Some(Proto::ALL.to_vec()),
        Some(list) => {
            let mut out = vec![];
            let mut ok = true;
            for p in list {
                match one_of(
                    d,
                    p,
                    "protocol",
                    &[("tcp", Proto::Tcp), ("udp", Proto::Udp)],
                ) {
                    Some(p) if !out.contains(&p) => out.push(p),
                    Some(_) => {}
                    None => ok = false,
                }
            }
            if list.is_empty() {
                d.error_fix(
                    &protocols_span,
                    "`protocols` is empty: nothing would be allowed",
                    "list [\"tcp\"], [\"udp\"] or both, or remove `protocols` to allow both",
                );
                ok = false;
            }
            ok.then_some(out)
        }
    };
    Some(Accessible {
        cidr: cidr_v?,
        ports: ports.flatten().unwrap_or_else(PortSet::all),
        protocols: protos.unwrap_or_else(|| Proto::ALL.to_vec()),
        pos: d.source.pos(&c?.span),
    })
}

fn rule_name_ok(d: &mut Diags, v: &At<String>) -> bool {
    check_name(
        d,
        v,
        "authorization name",
        64,
        |c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.',
        "A-Z, a-z, 0-9, -, _ and .",
    )
}

/// An `[[authorization]]` entry, and its name for the uniqueness check. None when its name, VPC or
/// address is missing or unreadable; any other mistake is reported and stood in for by the value as
/// written or the default, so the address is still checked against the instance.
fn parse_authorization(
    d: &mut Diags,
    mut f: Fields,
) -> (Option<Authorization>, Option<At<String>>) {
    let mut name = f.required_string(d, "name", "\"orders-slb\"");
    let mut vpc_id = f.required_string(d, "vpc_id", "\"vpc-...\"");
    let instance_id = f.string(d, "instance_id");
    let instance_type = f.string(d, "instance_type");
    let addr = f.required_string(d, "address", "\"10.0.3.7\"");
    let has_ports = f.has("ports");
    let present_ports = ports(d, &mut f, "ports");
    let protocol = f.string(d, "protocol");
    let span = f.span.clone();
    let what = f.what.clone();
    f.finish(d);
    if let Some(n) = &mut name {
        let ok = rule_name_ok(d, n);
        shorten_unless(ok, n);
    }
    if let Some(v) = &mut vpc_id {
        let ok = vpc_id_ok(d, v);
        shorten_unless(ok, v);
    }
    let itype = instance_type.as_ref().and_then(|t| {
        one_of(
            d,
            t,
            "instance_type",
            &[
                ("ecs", InstanceType::Ecs),
                ("clb", InstanceType::Clb),
                ("nlb", InstanceType::Nlb),
                ("ip", InstanceType::Ip),
            ],
        )
    });
    let address_v = addr.as_ref().and_then(|a| cidr(d, a, "address", true));
    if !has_ports {
        d.error_fix(
            &span,
            format!("{what} has no `ports`: an authorization names the service's ports"),
            "add e.g. `ports = [\"80\"]`",
        );
    }
    let proto = protocol.as_ref().and_then(|p| {
        one_of(
            d,
            p,
            "protocol",
            &[("tcp", Proto::Tcp), ("udp", Proto::Udp)],
        )
    });
    let authorization = (|| {
        Some(Authorization {
            name: name.as_ref()?.value.clone(),
            vpc_id: vpc_id?.value,
            instance_id: instance_id.map(|i| i.value),
            instance_type: itype.unwrap_or(InstanceType::Ip),
            address: address_v?,
            ports: present_ports.flatten().unwrap_or_else(PortSet::all),
            protocol: proto.unwrap_or(Proto::Tcp),
            pos: d.source.pos(&addr?.span),
        })
    })();
    (authorization, name)
}

/// An `[[upstream]]` entry, and its name for the uniqueness check. None without a name or VPC; the
/// nodes that could be read are kept (and checked), other mistakes stood in for by the default.
fn parse_upstream(d: &mut Diags, mut f: Fields) -> (Option<Upstream>, Option<At<String>>) {
    let mut name = f.required_string(d, "name", "\"orders_pool\"");
    let description = f.string(d, "description");
    let mut vpc_id = f.required_string(d, "vpc_id", "\"vpc-...\"");
    let protocol = f.string(d, "protocol");
    // The probe sends it as the Host header: a host name or address with an optional port, nothing that
    // could end the header line.
    let host_header = f.string(d, "host_header").filter(|h| {
        check_name(
            d,
            h,
            "host_header",
            255,
            |c| c.is_ascii_alphanumeric() || "-._:[]".contains(c),
            "letters, digits, '-', '.', '_', ':', '[' and ']' (a host name or address, optionally :port)",
        )
    });
    let retries = f.integer(d, "retries");
    let nodes = f.array(d, "nodes");
    let span = f.span.clone();
    let what = f.what.clone();
    f.finish(d);
    if let Some(n) = &mut name {
        let ok = check_name(
            d,
            n,
            "upstream name",
            50,
            |c| c.is_ascii_alphanumeric() || c == '_',
            "A-Z, a-z, 0-9 and _",
        );
        shorten_unless(ok, n);
    }
    if let Some(v) = &mut vpc_id {
        let ok = vpc_id_ok(d, v);
        shorten_unless(ok, v);
    }
    let proto = protocol.as_ref().and_then(|p| {
        one_of(
            d,
            p,
            "upstream protocol",
            &[
                ("http", UpstreamProtocol::Http),
                ("https", UpstreamProtocol::Https),
            ],
        )
    });
    let retries_v = match retries {
        Some(r) if RETRIES.contains(&r.value) => r.value as u32,
        Some(r) => {
            d.error_fix(
                &r.span,
                format!("retries {} is out of range 1..=100", r.value),
                "write a number from 1 to 100 (default 5)",
            );
            DEFAULT_RETRIES
        }
        None => DEFAULT_RETRIES,
    };
    let mut node_list = vec![];
    match &nodes {
        None => {
            d.error_fix(
                &span,
                format!("{what} has no `nodes`"),
                "add e.g. `nodes = [ { address = \"10.0.3.8\", port = 8080, weight = 10 } ]`",
            );
        }
        Some(arr) => {
            if arr.value.is_empty() || arr.value.len() > MAX_NODES {
                d.error_fix(
                    &arr.span,
                    format!(
                        "{what} has {} nodes: an upstream has 1 to {MAX_NODES}",
                        arr.value.len()
                    ),
                    if arr.value.is_empty() {
                        "add at least one node".to_owned()
                    } else {
                        format!("split it into upstreams of at most {MAX_NODES} nodes")
                    },
                );
            }
            for (i, item) in arr.value.iter().enumerate() {
                let DeValue::Table(t) = item.get_ref() else {
                    d.error(&item.span(), format!("node #{} of {what} must be a table {{ address = ..., port = ..., weight = ... }}", i + 1));
                    continue;
                };
                node_list.extend(parse_node(
                    d,
                    Fields::new(t, item.span(), format!("node #{} of {what}", i + 1)),
                ));
            }
        }
    }
    let upstream = (|| {
        let n = name.as_ref()?;
        Some(Upstream {
            name: n.value.clone(),
            description: description.map(|x| x.value),
            vpc_id: vpc_id?.value,
            protocol: proto.unwrap_or(UpstreamProtocol::Http),
            host_header: host_header.map(|h| h.value),
            retries: retries_v,
            nodes: node_list,
            pos: d.source.pos(&n.span),
        })
    })();
    (upstream, name)
}

/// A node: None when its address or port is missing or unreadable (the port names it in messages); a
/// wrong weight is reported and stood in for by the default.
fn parse_node(d: &mut Diags, mut f: Fields) -> Option<Node> {
    let addr = f.required_string(d, "address", "\"10.0.3.8\"");
    let port = f.integer(d, "port");
    let weight = f.integer(d, "weight");
    let span = f.span.clone();
    let what = f.what.clone();
    f.finish(d);
    let address_v = addr.as_ref().and_then(|a| address(d, a, "node address"));
    let port_v = match port {
        Some(p) if (1..=65535).contains(&p.value) => Some(p.value as u16),
        Some(p) => {
            d.error_fix(
                &p.span,
                format!("port {} of {what} is out of range 1..=65535", p.value),
                ports::RANGE_FIX,
            );
            None
        }
        None => {
            d.error_fix(
                &span,
                format!("{what} has no `port`"),
                "add e.g. `port = 8080`",
            );
            None
        }
    };
    let weight_v = match weight {
        Some(w) if WEIGHTS.contains(&w.value) => w.value as u32,
        Some(w) => {
            d.error_fix(
                &w.span,
                format!("weight {} of {what} is out of range 1..=100", w.value),
                "write a weight from 1 to 100 (default 10)",
            );
            DEFAULT_WEIGHT
        }
        None => DEFAULT_WEIGHT,
    };
    Some(Node {
        address: address_v?,
        port: port_v?,
        weight: weight_v,
        pos: d.source.pos(&addr?.span),
    })
}

fn parse_doc(d: &mut Diags, doc: &DeTable, span: Range<usize>) -> Parsed {
    let mut root = Fields::new(doc, span, "the policy file");
    let instance = match root.table(d, "instance") {
        Some(t) => parse_instance(d, Fields::new(t.value, t.span, "[instance]")),
        None => {
            root.missing(d, "instance", "{ ... } (an [instance] table)");
            None
        }
    };
    let mut p = Parsed {
        instance,
        accessible: vec![],
        accessible_read: true,
        authorizations: vec![],
        upstreams: vec![],
    };
    let mut names: HashMap<String, Pos> = HashMap::new();
    let mut unique = |d: &mut Diags, n: &At<String>| {
        let pos = d.source.pos(&n.span);
        if let Some(first) = names.get(&n.value) {
            d.error_fix(
                &n.span,
                format!("name `{}` is already used at line {}", n.value, first.line),
                "authorization and upstream names must be unique: rename one",
            );
        } else {
            names.insert(n.value.clone(), pos);
        }
    };
    let mut unread = 0;
    let tables_read = tables(
        d,
        &mut root,
        "accessible",
        |d, f, _| match parse_accessible(d, f) {
            Some(a) => p.accessible.push(a),
            None => unread += 1,
        },
    );
    p.accessible_read = tables_read && unread == 0;
    tables(d, &mut root, "authorization", |d, f, _| {
        let (a, n) = parse_authorization(d, f);
        if let Some(n) = &n {
            unique(d, n);
        }
        p.authorizations.extend(a);
    });
    tables(d, &mut root, "upstream", |d, f, _| {
        let (u, n) = parse_upstream(d, f);
        if let Some(n) = &n {
            unique(d, n);
        }
        p.upstreams.extend(u);
    });
    root.finish(d);
    p
}

/// Parses `source` into a policy, reporting every field-level problem into `d`. When some entries had
/// errors the policy holds what could be read of them (so cross-field validation can still report on
/// them) and `d` has errors: such a policy must never be applied. No policy when there is no usable
/// `[instance]`.
pub fn parse(d: &mut Diags, source: &Source) -> Read {
    let doc = match DeTable::parse(&source.text) {
        Ok(doc) => doc,
        Err(e) => {
            toml_error(d, source, &e);
            return Read {
                policy: None,
                accessible_known: false,
            };
        }
    };
    let span = doc.span();
    let parsed = parse_doc(d, doc.get_ref(), span);
    let Some((instance, vswitch_known)) = parsed.instance else {
        return Read {
            policy: None,
            accessible_known: false,
        };
    };
    Read {
        policy: Some(Policy {
            instance,
            accessible: parsed.accessible,
            authorizations: parsed.authorizations,
            upstreams: parsed.upstreams,
        }),
        accessible_known: vswitch_known && parsed.accessible_read,
    }
}

/// A TOML syntax error, with its position. The parser says only "duplicate key": name the key and,
/// when it can be found, where it was first defined.
fn toml_error(d: &mut Diags, source: &Source, e: &toml::de::Error) {
    let span = e.span().unwrap_or(0..0);
    let written = source.text.get(span.clone()).unwrap_or_default().trim();
    if e.message() != "duplicate key" || written.is_empty() {
        d.error(&span, format!("not valid TOML: {}", e.message()));
        return;
    }
    let name = written.trim_matches(['"', '\'']);
    let (doc, _) = DeTable::parse_recoverable(&source.text);
    let first = first_key_before(&source.text, doc.get_ref(), name, span.start)
        .or_else(|| first_header_before(&source.text, span.clone()))
        .map(|at| source.line_col(at))
        .map_or(String::new(), |(line, column)| {
            format!(": already defined at line {line}, column {column}")
        });
    d.error_fix(
        &span,
        format!("not valid TOML: duplicate key `{written}`{first}"),
        format!("a key (and a [table]) is defined once per table: remove or merge one of the `{written}`"),
    );
}

/// Where the last key named `name` before `before` is, in the tables that can hold the duplicate (not
/// in an inline table that ends before it): in TOML a table's own keys are written together, so that
/// is the first definition of the duplicate.
fn first_key_before(text: &str, table: &DeTable, name: &str, before: usize) -> Option<usize> {
    fn value(
        text: &str,
        v: &DeValue,
        span: Range<usize>,
        name: &str,
        before: usize,
    ) -> Option<usize> {
        match v {
            DeValue::Table(t) => {
                let inline = text.as_bytes().get(span.start) == Some(&b'{');
                if inline && !span.contains(&before) {
                    return None;
                }
                first_key_before(text, t, name, before)
            }
            DeValue::Array(a) => a
                .iter()
                .filter_map(|item| value(text, item.get_ref(), item.span(), name, before))
                .max(),
            _ => None,
        }
    }
    table
        .iter()
        .flat_map(|(k, v)| {
            let own =
                (k.get_ref().as_ref() == name && k.span().start < before).then_some(k.span().start);
            own.into_iter()
                .chain(value(text, v.get_ref(), v.span(), name, before))
        })
        .max()
}

/// A `[table]` defined twice: the parser keeps only the second header, so look for the first in the text
/// (a line that starts with the same header).
fn first_header_before(text: &str, key: Range<usize>) -> Option<usize> {
    let line_start = text.get(..key.start)?.rfind('\n').map_or(0, |i| i + 1);
    let header = text.get(line_start..key.end)?.trim_start();
    if !header.starts_with('[') {
        return None;
    }
    let mut offset = 0;
    for line in text.get(..line_start)?.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(header)
            && rest.trim_start().starts_with(']')
        {
            return Some(offset + line.len() - trimmed.len() + 1);
        }
        offset += line.len();
    }
    None
}
