//! `node.json` in the data directory: who this node is, so that a restart needs no flag but
//! `--data-dir` (issue 17). Written once the node serves, and again whenever the topology's
//! members change; read at start, before the configuration is validated.
//!
//! ```json
//! {"format": 1, "node_id": 2, "resp": "10.0.0.2:6379", "http": "10.0.0.2:8080",
//!  "peer": "10.0.0.2:7380", "peers": {"1": "10.0.0.1:7380", "2": "10.0.0.2:7380"},
//!  "placement": {"version": 1, "partitions": [...]}}
//! ```
//! `placement` is the default keyspace's, as the topology last gave it: keys route by it at
//! start until the node's meta replica has the topology back, so a restart given none of
//! the original settings never routes by a partition count of its own.
//! What a start gives explicitly (a flag, the environment or the YAML file) wins, but for the
//! node id: a data directory belongs to one node, and starting it as another is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the data directory.
pub const FILE: &str = "node.json";
const FORMAT_V1: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub node_id: u64,
    /// The addresses the node listened on (as bound: a port 0 became a real port).
    pub resp: String,
    pub http: String,
    pub peer: String,
    /// Every member's peer address, as the topology last listed them.
    pub peers: BTreeMap<u64, String>,
    #[serde(default)]
    pub placement: Option<replikv_placement::PlacementTable>,
}

impl Identity {
    pub fn new(
        node_id: u64,
        resp: String,
        http: String,
        peer: String,
        peers: BTreeMap<u64, String>,
        placement: Option<replikv_placement::PlacementTable>,
    ) -> Identity {
        Identity {
            format: FORMAT_V1,
            node_id,
            resp,
            http,
            peer,
            peers,
            placement,
        }
    }
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The identity stored in `dir`, if there is one.
pub fn load(dir: &Path) -> Result<Option<Identity>, String> {
    let file = path(dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", file.display())),
    };
    let id: Identity = serde_json::from_str(&text)
        .map_err(|e| format!("{} does not read as a node identity: {e}", file.display()))?;
    if id.format != FORMAT_V1 {
        return Err(format!(
            "{} is of format {}, which this build does not know (written by a newer replikv)",
            file.display(),
            id.format
        ));
    }
    Ok(Some(id))
}

/// Writes `id` to `dir` whole or not at all (a temporary file, synced, then renamed).
pub fn save(dir: &Path, id: &Identity) -> Result<(), String> {
    let file = path(dir);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let text = serde_json::to_string_pretty(id).expect("an identity always encodes");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("writing {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_round_trips_and_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let peers = [(1, "a:1".to_string()), (2, "b:2".to_string())].into();
        let id = Identity::new(2, "r".into(), "h".into(), "b:2".into(), peers, None);
        save(dir.path(), &id).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(id.clone()));
        let newer = serde_json::to_string(&Identity { format: 2, ..id }).unwrap();
        std::fs::write(dir.path().join(FILE), newer).unwrap();
        assert!(load(dir.path()).unwrap_err().contains("format 2"));
        std::fs::write(dir.path().join(FILE), "{").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
