//! TCP throughput between the lab's namespaces without vpcgate and with its programs attached (TC egress +
//! XDP ingress on the gateway's veth, a policy that allows the stream). A measurement, not a test: it
//! prints MB/s per round and the median ratio with/without, and asserts nothing about speed.
//!
//! `tcp_throughput [BYTES_PER_RUN] [ROUNDS]` (defaults: 512 MiB, 5), as root. Two directions:
//! `egress` (the gateway sends to a VPC backend: every data segment through TC egress's verdict) and
//! `reply` (a VPC client sends to a gateway server: data through XDP's flow recording, the gateway's
//! ACKs through TC egress as replies, rule 3). Rounds interleave without/with so drift hits both alike.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use vpcgate::{
    datapath::{Datapath, XdpRole},
    policy::{check_text, compile::Compiled},
};
use vpcgate_lab::netns::{GW_IF, GW_V4, Netns, Pair, VPC_V4};

const POLICY: &str = r#"
[instance]
name = "bench"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "veth-gw"
egress_ip = "10.200.0.1"

[[authorization]]
name = "sink"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["5201"]
"#;

const CHUNK: usize = 1 << 20;

/// Streams `bytes` from a client in `from` to a server in `to` at `server`; MB/s (10^6 bytes/s) from
/// the first write until the server acknowledged the last byte.
fn stream(from: &Netns, to: &Netns, server: SocketAddr, bytes: u64) -> f64 {
    let listener =
        to.run(|| TcpListener::bind(server).unwrap_or_else(|e| panic!("bind {server}: {e}")));
    let sink = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            let n = c.read(&mut buf).expect("sink read");
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        c.write_all(b"k").expect("ack");
        got
    });
    let elapsed = from.run(|| {
        let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {server}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let data = vec![0x5au8; CHUNK];
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            c.write_all(&data[..n]).expect("stream write");
            left -= n as u64;
        }
        c.shutdown(Shutdown::Write).unwrap();
        let mut ack = [0u8; 1];
        c.read_exact(&mut ack).expect("the sink's acknowledgement");
        start.elapsed()
    });
    let got = sink.join().expect("sink thread");
    assert_eq!(got, bytes, "the sink received {got} of {bytes} bytes");
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn attach(pair: &Pair, compiled: &Compiled) -> Datapath {
    let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    dp.apply(compiled).unwrap_or_else(|e| panic!("{e}"));
    pair.gw.run(|| {
        // new-datapath-only (flows toward the gateway's own addresses)
        dp.set_local_addresses(&vpcgate::datapath::host_addresses().expect("addresses"))
            .expect("local addresses");
        dp.attach_tc_egress(GW_IF).unwrap_or_else(|e| panic!("{e}"));
        dp.attach_xdp(GW_IF, XdpRole::EniIngress)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    dp
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn main() {
    vpcgate_lab::require_root();
    let mut args = std::env::args().skip(1);
    let bytes: u64 = args
        .next()
        .map_or(512 << 20, |a| a.parse().expect("BYTES_PER_RUN"));
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("ROUNDS"));
    let checked = check_text("bench.toml", POLICY);
    let policy = checked
        .policy
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    let compiled = Compiled::new(&policy);
    let pair = Pair::new();
    let egress: SocketAddr = format!("{VPC_V4}:5201").parse().unwrap();
    let reply: SocketAddr = format!("{GW_V4}:5202").parse().unwrap();
    // Warm-up: neighbour entries, page cache of the binary, CPU frequency.
    stream(&pair.gw, &pair.vpc, egress, bytes / 4);

    println!("{bytes} bytes per run, {rounds} rounds");
    println!(
        "{:>5} {:>8} {:>12} {:>12} {:>7}",
        "round", "dir", "without MB/s", "with MB/s", "ratio"
    );
    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> =
        vec![("egress", vec![], vec![]), ("reply", vec![], vec![])];
    for round in 0..rounds {
        for (dir, without, with) in results.iter_mut() {
            let (from, to, at) = match *dir {
                "egress" => (&pair.gw, &pair.vpc, egress),
                _ => (&pair.vpc, &pair.gw, reply),
            };
            // Alternate which goes first so neither always runs on a warmer system.
            let run_with = || {
                let dp = attach(&pair, &compiled);
                let r = stream(from, to, at, bytes);
                let drops: u64 = dp
                    .drop_counts()
                    .expect("drop counts")
                    .dropped
                    .values()
                    .sum();
                assert_eq!(drops, 0, "vpcgate dropped packets of an allowed stream");
                drop(dp);
                r
            };
            let (a, b) = if round % 2 == 0 {
                let a = stream(from, to, at, bytes);
                (a, run_with())
            } else {
                let b = run_with();
                (stream(from, to, at, bytes), b)
            };
            without.push(a);
            with.push(b);
            println!("{round:>5} {dir:>8} {a:>12.0} {b:>12.0} {:>7.3}", b / a);
        }
    }
    for (dir, without, with) in &results {
        let (a, b) = (median(without), median(with));
        println!(
            "median {dir}: without {a:.0} MB/s, with {b:.0} MB/s, ratio with/without {:.3}",
            b / a
        );
    }
}
