//! Probe connections in the kernel (DESIGN.md "Probe flows"): `vpcgate probe` registers its
//! connection's 5-tuple before connecting, reads what the kernel recorded for exactly that connection,
//! and removes it afterwards.

use std::net::SocketAddr;

use aya::maps::HashMap;
use vpcgate_common::datapath::{FlowKey, ProbeObs, names};

use super::{Datapath, DatapathError};

const IPPROTO_TCP: u8 = 6;

fn bytes(a: std::net::IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match a {
        std::net::IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (4, out)
        }
        std::net::IpAddr::V6(v6) => (6, v6.octets()),
    }
}

/// The key TC egress builds for a TCP connection from `local` to `remote`.
pub fn probe_key(local: SocketAddr, remote: SocketAddr) -> FlowKey {
    let (family, l) = bytes(local.ip());
    let (_, r) = bytes(remote.ip());
    FlowKey {
        family,
        proto: IPPROTO_TCP,
        local_port: local.port().to_be_bytes(),
        remote_port: remote.port().to_be_bytes(),
        _pad: [0; 2],
        local: l,
        remote: r,
    }
}

impl Datapath {
    fn probes(
        &mut self,
    ) -> Result<HashMap<&mut aya::maps::MapData, FlowKey, ProbeObs>, DatapathError> {
        let m = self
            .ebpf_mut()
            .map_mut(names::PROBES)
            .ok_or(DatapathError::MissingMap(names::PROBES))?;
        HashMap::try_from(m).map_err(|source| DatapathError::Map {
            map: names::PROBES,
            source,
        })
    }

    /// Registers a probe connection (zeroed record; `PROBES` is an LRU: the oldest record makes room).
    pub fn register_probe(&mut self, key: &FlowKey) -> Result<(), DatapathError> {
        self.probes()?
            .insert(key, ProbeObs::default(), 0)
            .map_err(|source| DatapathError::Map {
                map: names::PROBES,
                source,
            })
    }

    /// What the kernel recorded for a registered probe connection.
    pub fn probe_record(&mut self, key: &FlowKey) -> Result<ProbeObs, DatapathError> {
        self.probes()?
            .get(key, 0)
            .map_err(|source| DatapathError::Map {
                map: names::PROBES,
                source,
            })
    }

    /// Removes a probe connection's record (gone already is fine).
    pub fn forget_probe(&mut self, key: &FlowKey) -> Result<(), DatapathError> {
        match self.probes()?.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                map: names::PROBES,
                source,
            }),
        }
    }
}
