//! Binds a data dir to one cluster and one node, so that a sidecar pointed at another cluster's
//! data refuses to start instead of mixing two logs. The identity is a small file beside the
//! Raft store, checked before the store is opened, so a refused start writes nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

const FILE: &str = "identity.json";

/// Which cluster and node a data dir belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDirIdentity {
    /// Cluster name from the node's config at first start.
    pub cluster_name: String,
    /// Node id from the node's config at first start.
    pub node_id: NodeId,
}

/// Why a data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The data dir holds another cluster's state.
    #[error(
        "it belongs to cluster '{found}', but the config says cluster_name = '{expected}'; \
         point data_dir at an empty directory, or fix cluster_name"
    )]
    OtherCluster {
        /// Name stored in the data dir.
        found: String,
        /// Name in the config.
        expected: String,
    },
    /// The data dir holds another node's state.
    #[error(
        "it belongs to node {found} of this cluster, but the config says node_id = {expected}; \
         each node needs its own data_dir"
    )]
    OtherNode {
        /// Id stored in the data dir.
        found: NodeId,
        /// Id in the config.
        expected: NodeId,
    },
    /// Holds Raft state but no identity: not made by this version of pgquorum.
    #[error("it holds a Raft store but no {FILE}; it was not created by a pgquorum node, use an empty directory")]
    Unknown,
    /// The identity file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The stored identity is not readable.
    #[error("{FILE} is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// Checks the identity recorded in `dir` against `expected`; records it if the dir is new.
pub fn check_or_record(dir: &Path, expected: &DataDirIdentity) -> Result<(), IdentityError> {
    let path = dir.join(FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(raw) => {
            let found: DataDirIdentity = serde_json::from_slice(&raw)?;
            if found.cluster_name != expected.cluster_name {
                return Err(IdentityError::OtherCluster {
                    found: found.cluster_name,
                    expected: expected.cluster_name.clone(),
                });
            }
            if found.node_id != expected.node_id {
                return Err(IdentityError::OtherNode {
                    found: found.node_id,
                    expected: expected.node_id,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("raft").exists() {
                return Err(IdentityError::Unknown);
            }
            // Write beside, fsync, rename: a crash leaves either no identity or a whole one.
            let tmp = dir.join(format!("{FILE}.tmp"));
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&serde_json::to_vec_pretty(expected)?)
                .map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            Ok(())
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_then_refuses_other_cluster_and_node() {
        let dir = tempfile::tempdir().unwrap();
        let me = DataDirIdentity {
            cluster_name: "a".into(),
            node_id: 1,
        };
        check_or_record(dir.path(), &me).unwrap();
        check_or_record(dir.path(), &me).unwrap();
        let other = DataDirIdentity {
            cluster_name: "b".into(),
            node_id: 1,
        };
        assert!(matches!(
            check_or_record(dir.path(), &other),
            Err(IdentityError::OtherCluster { .. })
        ));
        let other_node = DataDirIdentity {
            cluster_name: "a".into(),
            node_id: 2,
        };
        assert!(matches!(
            check_or_record(dir.path(), &other_node),
            Err(IdentityError::OtherNode { .. })
        ));
    }

    #[test]
    fn refuses_a_store_without_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("raft")).unwrap();
        let me = DataDirIdentity {
            cluster_name: "a".into(),
            node_id: 1,
        };
        assert!(matches!(
            check_or_record(dir.path(), &me),
            Err(IdentityError::Unknown)
        ));
        assert!(!dir.path().join(FILE).exists());
    }
}
