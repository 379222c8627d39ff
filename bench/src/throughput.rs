//! Throughput over veth between two namespaces (to be written).
use serde::Serialize;

#[derive(Serialize, Clone, Debug)]
pub struct Row {}

pub fn run(_opts: &crate::Opts, _seed: u64, _p: &crate::Progress) -> anyhow::Result<Vec<Row>> {
    anyhow::bail!("not written yet")
}

pub fn markdown(_rows: &[Row]) -> String {
    String::new()
}

pub fn plots(_dir: &std::path::Path, _rows: &[Row]) -> anyhow::Result<()> {
    Ok(())
}
