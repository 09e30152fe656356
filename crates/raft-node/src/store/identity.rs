//! Binds a data dir to one cluster and one node, so that a sidecar pointed at another cluster's
//! data refuses to start instead of mixing two logs.

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

const KEY: &[u8] = b"identity";

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
        "data dir belongs to cluster '{found}', but the config says cluster '{expected}'; \
         point data_dir at an empty directory, or fix `cluster_name`"
    )]
    OtherCluster {
        /// Name stored in the data dir.
        found: String,
        /// Name in the config.
        expected: String,
    },
    /// The data dir holds another node's state.
    #[error(
        "data dir belongs to node {found} of this cluster, but the config says node_id = {expected}; \
         each node needs its own data_dir"
    )]
    OtherNode {
        /// Id stored in the data dir.
        found: NodeId,
        /// Id in the config.
        expected: NodeId,
    },
    /// sled failed.
    #[error("data dir storage error: {0}")]
    Storage(#[from] sled::Error),
    /// The stored identity is not readable.
    #[error("data dir identity record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// Checks the identity stored in `db` against `expected`; records it if the dir is new.
pub fn check_or_record(db: &sled::Db, expected: &DataDirIdentity) -> Result<(), IdentityError> {
    let meta = db.open_tree("meta")?;
    match meta.get(KEY)? {
        Some(raw) => {
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
        None => {
            meta.insert(KEY, serde_json::to_vec(expected)?)?;
            db.flush()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_then_refuses_other_cluster_and_node() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db(dir.path()).unwrap();
        let me = DataDirIdentity {
            cluster_name: "a".into(),
            node_id: 1,
        };
        check_or_record(&db, &me).unwrap();
        check_or_record(&db, &me).unwrap();
        let other = DataDirIdentity {
            cluster_name: "b".into(),
            node_id: 1,
        };
        assert!(matches!(
            check_or_record(&db, &other),
            Err(IdentityError::OtherCluster { .. })
        ));
        let other_node = DataDirIdentity {
            cluster_name: "a".into(),
            node_id: 2,
        };
        assert!(matches!(
            check_or_record(&db, &other_node),
            Err(IdentityError::OtherNode { .. })
        ));
    }
}
