//! Property-based fuzzing of the decoders that read bytes pgquorum did not produce itself: Raft
//! log entries and transport payloads (serde JSON), members' reports (protobuf), the node's TOML
//! config and `config set` changes. `cargo fuzz` needs a nightly toolchain, so proptest stands in:
//! every property feeds arbitrary input, structure-aware input, or mutations of valid encodings,
//! and asserts the decoder answers with an error or with a value that re-encodes consistently,
//! never with a panic: a panic while applying an entry stops the node's Raft, and every member
//! applies the same entries, so one bad entry would stop them all.
//!
//! `PGQUORUM_FUZZ_CASES` sets the cases per property (default [`DEFAULT_CASES`], sized for the
//! debug build of this binary to take 20 to 40 s on two cores); raise it to search longer.
//! Failures are not persisted (no regression files in the repo): proptest prints the shrunk
//! input instead.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::Path;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    StoredMembership, Vote,
};
use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;
use prost::Message;
use raft_node::cluster_state::{
    ClusterState, Command, CommandOutcome, MemberInfo, PlanKind, PrimaryPlan, SyncSet, Tags,
    HISTORY_LIMIT,
};
use raft_node::dynamic_config::{DynamicConfig, KEYS};
use raft_node::failover::report::{record, MemberReport, ReportBook};
use raft_node::node_config::NodeConfig;
use raft_node::pg_settings::{PgSettings, HBA_KEY};
use raft_node::proto;
use raft_node::store::state_machine::AppliedState;
use raft_node::types::TypeConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Cases per property unless `PGQUORUM_FUZZ_CASES` says otherwise.
const DEFAULT_CASES: u32 = 6144;

/// The proptest configuration of a property that costs about `weight` times a plain decode per
/// case: heavier properties run proportionally fewer cases, so that raising
/// `PGQUORUM_FUZZ_CASES` lengthens every property alike.
fn fuzz_config(weight: u32) -> ProptestConfig {
    let base = std::env::var("PGQUORUM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases: (base / weight.max(1)).max(1),
        // Regression files would land in the source tree; the shrunk case is printed instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations of valid encodings.
// ---------------------------------------------------------------------------------------------

/// Bytes that change the meaning of JSON, TOML or their strings when dropped in anywhere.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-",
    "1e999",
    "-0",
    "\"\\ud800\"",
    "\\u0000",
    "{\"\":{}}",
    "[[[[[[[[[[[[",
    "]]]]",
    "=",
    "[[",
    "\n",
    "#",
    "'''",
    "\"\"\"",
    "\n[raft]\n",
    "\n[[initial_members]]\n",
    "\n[postgres]\n",
    "inf",
    "nan",
    "1979-05-27T07:32:00Z",
    "0x7f",
    "0o777",
    "_",
    "+",
    ".",
    "\r\n",
    "\u{feff}",
    "\u{0}",
    "\u{85}",
    "é",
    "🦀",
];

/// Numbers at the edges of the integer types the decoders map into.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "4294967295",
    "4294967296",
    "2147483648",
    "65535",
    "65536",
    "1.5",
    "1e3",
    "99999999999999999999999999999",
];

/// One edit of an encoding; positions are taken modulo its length.
#[derive(Debug, Clone)]
enum Edit {
    FlipBit(Index, u8),
    Overwrite(Index, u8),
    Insert(Index, Vec<u8>),
    InsertToken(Index, &'static str),
    Delete(Index, usize),
    Truncate(Index),
    Duplicate(Index, usize, Index),
    /// Replaces the n-th run of digits, so a structurally valid value goes out of range.
    Number(Index, &'static str),
    DeleteLine(Index),
    DuplicateLine(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::FlipBit(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Overwrite(i, b)),
        1 => (any::<Index>(), vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<Index>(), select(TOKENS)).prop_map(|(i, t)| Edit::InsertToken(i, t)),
        1 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => (any::<Index>(), 1usize..32, any::<Index>()).prop_map(|(i, n, to)| Edit::Duplicate(i, n, to)),
        3 => (any::<Index>(), select(NUMBERS)).prop_map(|(i, n)| Edit::Number(i, n)),
        1 => any::<Index>().prop_map(Edit::DeleteLine),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
    ]
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    vec(edit(), 1..5)
}

/// Start and end of every line (end exclusive, newline included).
fn lines_of(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in b.iter().enumerate() {
        if *c == b'\n' {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < b.len() {
        out.push((start, b.len()));
    }
    out
}

fn digit_runs(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push((start, i));
        } else {
            i += 1;
        }
    }
    out
}

fn mutate(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = b.len();
        match e {
            Edit::Insert(i, bytes) => {
                let at = i.index(len + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Edit::InsertToken(i, t) => {
                let at = i.index(len + 1);
                b.splice(at..at, t.bytes());
            }
            _ if len == 0 => {}
            Edit::FlipBit(i, bit) => b[i.index(len)] ^= 1 << bit,
            Edit::Overwrite(i, v) => b[i.index(len)] = *v,
            Edit::Delete(i, n) => {
                let at = i.index(len);
                b.drain(at..(at + n).min(len));
            }
            Edit::Truncate(i) => b.truncate(i.index(len)),
            Edit::Duplicate(i, n, to) => {
                let at = i.index(len);
                let piece: Vec<u8> = b[at..(at + n).min(len)].to_vec();
                let to = to.index(len + 1);
                b.splice(to..to, piece);
            }
            Edit::Number(i, n) => {
                let runs = digit_runs(&b);
                if !runs.is_empty() {
                    let (s, t) = runs[i.index(runs.len())];
                    b.splice(s..t, n.bytes());
                }
            }
            Edit::DeleteLine(i) => {
                let lines = lines_of(&b);
                let (s, t) = lines[i.index(lines.len())];
                b.drain(s..t);
            }
            Edit::DuplicateLine(i) => {
                let lines = lines_of(&b);
                let (s, t) = lines[i.index(lines.len())];
                let line = b[s..t].to_vec();
                b.splice(t..t, line);
            }
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Structure-aware generators.
// ---------------------------------------------------------------------------------------------

const EXTREME_U64: &[u64] = &[
    u64::MAX,
    u64::MAX - 1,
    u64::MAX / 2,
    u64::MAX / 2 + 1,
    i64::MAX as u64,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
];

/// Mostly the ids of a small cluster (so commands hit members), sometimes anything.
fn node_id() -> BoxedStrategy<u64> {
    prop_oneof![6 => 0u64..6, 1 => any::<u64>(), 1 => select(EXTREME_U64)].boxed()
}

fn number() -> BoxedStrategy<u64> {
    prop_oneof![4 => 0u64..10_000, 1 => any::<u64>(), 1 => select(EXTREME_U64)].boxed()
}

/// Raft timings as members register them: the cluster's own, unset, or hostile.
fn timing() -> BoxedStrategy<u64> {
    prop_oneof![2 => Just(0u64), 2 => Just(150u64), 2 => Just(600u64), 3 => number()].boxed()
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z]{1,8}",
        1 => Just(String::new()),
        1 => " {1,3}",
        2 => any::<String>(),
        1 => vec(any::<char>(), 0..3000).prop_map(String::from_iter),
    ]
    .boxed()
}

fn sync_set() -> BoxedStrategy<SyncSet> {
    (
        btree_set(node_id(), 0..8),
        prop_oneof![3 => 0u32..4, 1 => any::<u32>()],
    )
        .prop_map(|(members, k)| SyncSet { members, k })
        .boxed()
}

fn member_info() -> BoxedStrategy<MemberInfo> {
    (
        (node_id(), text(), text(), text(), any::<u16>()),
        (any::<bool>(), any::<i32>(), any::<bool>()),
        (timing(), timing()),
    )
        .prop_map(
            |(
                (id, name, http_addr, pg_host, pg_port),
                (nofailover, priority, nosync),
                (raft_heartbeat_ms, raft_election_max_ms),
            )| MemberInfo {
                id,
                name,
                http_addr,
                pg_host,
                pg_port,
                tags: Tags {
                    nofailover,
                    priority,
                    nosync,
                },
                raft_heartbeat_ms,
                raft_election_max_ms,
            },
        )
        .boxed()
}

/// Changes every one of which is valid on its own, so that change sets reach the checks made
/// after parsing (the lease floor, the all-or-nothing rule).
const VALID_SETTINGS: &[(&str, &str)] = &[
    ("lease_ms", "3000"),
    ("lease_ms", "2500"),
    ("tick_ms", "250"),
    ("tick_ms", "100"),
    ("drift_margin_ms", "200"),
    ("failure_threshold", "5"),
    ("maximum_lag_on_failover", "0"),
    ("synchronous_mode", "quorum"),
    ("synchronous_mode", "off"),
    ("synchronous_node_count", "2"),
    ("restart_before_failover", "yes"),
    ("leader_handoff", "off"),
    ("failover_on_write_failure", "false"),
    ("failover_min_free_bytes", "0"),
    ("switchover_timeout_ms", "60000"),
    ("stale_slot_grace_ms", "1"),
    ("postgresql.parameters.work_mem", "64MB"),
    ("postgresql.parameters.work_mem", ""),
    ("postgresql.pg_hba", "host all app 10.0.0.0/8 scram-sha-256"),
];

const VALUE_WORDS: &[&str] = &[
    "on", "off", "true", "false", "yes", "no", "quorum", "strict", "ON", "1", "0", " 5 ", "", "-1",
    "+7", "1e3", "0x10", "1_000",
];

const HBA_SAMPLES: &[&str] = &[
    "host all all 0.0.0.0/0 trust",
    "local all all trust",
    "hostssl all app 10.0.0.0/8 scram-sha-256",
    "# a comment",
    "host all",
    "",
];

fn setting_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => number().prop_map(|n| n.to_string()),
        2 => select(VALUE_WORDS).prop_map(String::from),
        1 => select(NUMBERS).prop_map(String::from),
        1 => "[ \t]*[0-9]{1,25}[ \t]*",
        2 => any::<String>(),
    ]
    .boxed()
}

fn hba_text() -> BoxedStrategy<String> {
    vec(
        prop_oneof![
            2 => select(HBA_SAMPLES).prop_map(String::from),
            2 => "(host|local|hostssl|hots) [a-z]{1,5} [a-z]{1,5}( [0-9./]{1,18})? (trust|md5|scram-sha-256|peer)",
            1 => any::<String>(),
        ],
        0..5,
    )
    .prop_map(|lines| lines.join("\n"))
    .boxed()
}

fn setting() -> BoxedStrategy<(String, String)> {
    prop_oneof![
        3 => select(VALID_SETTINGS).prop_map(|(k, v)| (k.to_string(), v.to_string())),
        3 => (select(KEYS), setting_value()).prop_map(|(k, v)| (k.to_string(), v)),
        1 => ("postgresql\\.parameters\\.[a-zA-Z_.-]{0,70}", setting_value()),
        1 => (Just(HBA_KEY.to_string()), hba_text()),
        1 => (any::<String>(), any::<String>()),
    ]
    .boxed()
}

fn changes() -> BoxedStrategy<BTreeMap<String, String>> {
    vec(setting(), 0..5)
        .prop_map(|v| v.into_iter().collect())
        .boxed()
}

fn plan() -> BoxedStrategy<PrimaryPlan> {
    (
        (
            number(),
            any::<bool>(),
            prop_oneof![3 => 0u64..4, 1 => number()],
        ),
        (node_id(), node_id(), number(), number(), any::<bool>()),
    )
        .prop_map(
            |(
                (id, failover, epoch),
                (from, to, not_before_unix_ms, requested_at_unix_ms, started),
            )| {
                PrimaryPlan {
                    id,
                    kind: if failover {
                        PlanKind::Failover
                    } else {
                        PlanKind::Switchover
                    },
                    epoch,
                    from,
                    to,
                    not_before_unix_ms,
                    requested_at_unix_ms,
                    started,
                }
            },
        )
        .boxed()
}

/// Epochs near the seeded state's (so commands are not all refused as stale), or anything.
fn epoch() -> BoxedStrategy<u64> {
    prop_oneof![3 => 0u64..4, 1 => number()].boxed()
}

fn command() -> BoxedStrategy<Command> {
    prop_oneof![
        3 => member_info().prop_map(Command::RegisterMember),
        3 => changes().prop_map(|changes| Command::SetConfig { changes }),
        2 => (node_id(), epoch(), text(), number(), proptest::option::of(number()), sync_set())
            .prop_map(|(node, epoch, reason, at_unix_ms, lsn, sync)| Command::Promote {
                node,
                epoch,
                reason,
                at_unix_ms,
                lsn,
                sync,
            }),
        1 => (epoch(), sync_set()).prop_map(|(epoch, target)| Command::SetSyncTarget { epoch, target }),
        1 => (epoch(), sync_set()).prop_map(|(epoch, set)| Command::CommitSync { epoch, set }),
        1 => (epoch(), number()).prop_map(|(epoch, lsn)| Command::RecordPrimaryLsn { epoch, lsn }),
        1 => Just(Command::SettleLeaseCeiling),
        1 => any::<bool>().prop_map(|paused| Command::SetPaused { paused }),
        1 => plan().prop_map(|plan| Command::PlanPrimary { plan }),
        1 => prop_oneof![0u64..4, number()].prop_map(|id| Command::StartPlan { id }),
        1 => number().prop_map(|sysid| Command::SetSystemIdentifier { sysid }),
        1 => (prop_oneof![0u64..4, number()], text()).prop_map(|(id, reason)| Command::CancelPlan { id, reason }),
    ]
    .boxed()
}

/// [`command`] with Raft timings a member can run with. The generators that build snapshot
/// states by applying commands use it, so that they do not trip over the lease-floor panic that
/// `applying_arbitrary_command_sequences_never_panics` reports and the snapshot properties stay
/// about the snapshot decoder (mutations still put extreme numbers into the snapshots).
fn runnable_command() -> BoxedStrategy<Command> {
    command()
        .prop_map(|mut cmd| {
            if let Command::RegisterMember(m) = &mut cmd {
                m.raft_heartbeat_ms %= 100_000;
                m.raft_election_max_ms %= 100_000;
            }
            cmd
        })
        .boxed()
}

/// The ids in the Raft membership a command is applied under.
fn raft_members() -> BoxedStrategy<BTreeSet<u64>> {
    prop_oneof![
        3 => Just((1u64..=3).collect::<BTreeSet<u64>>()),
        1 => btree_set(node_id(), 0..6),
    ]
    .boxed()
}

/// Object keys pgquorum's and openraft's JSON encodings use, so that generated JSON reaches
/// past "unknown variant" into the fields.
const WORDS: &[&str] = &[
    "RegisterMember",
    "SetConfig",
    "Promote",
    "SetSyncTarget",
    "CommitSync",
    "RecordPrimaryLsn",
    "SettleLeaseCeiling",
    "SetPaused",
    "PlanPrimary",
    "StartPlan",
    "SetSystemIdentifier",
    "CancelPlan",
    "id",
    "name",
    "http_addr",
    "pg_host",
    "pg_port",
    "tags",
    "nofailover",
    "priority",
    "nosync",
    "raft_heartbeat_ms",
    "raft_election_max_ms",
    "changes",
    "node",
    "epoch",
    "reason",
    "at_unix_ms",
    "lsn",
    "sync",
    "members",
    "k",
    "target",
    "set",
    "paused",
    "plan",
    "kind",
    "switchover",
    "failover",
    "from",
    "to",
    "not_before_unix_ms",
    "requested_at_unix_ms",
    "started",
    "sysid",
    "primary",
    "history",
    "config",
    "committed",
    "legacy",
    "revision",
    "primary_lsn",
    "lease_ceiling",
    "lease_ms",
    "tick_ms",
    "drift_margin_ms",
    "synchronous_mode",
    "plan_seq",
    "last_plan",
    "outcome",
    "done",
    "pg",
    "parameters",
    "hba",
    "system_identifier",
    "vote",
    "leader_id",
    "term",
    "node_id",
    "prev_log_id",
    "index",
    "entries",
    "log_id",
    "payload",
    "Normal",
    "Membership",
    "Blank",
    "leader_commit",
    "last_log_id",
    "meta",
    "last_membership",
    "membership",
    "configs",
    "nodes",
    "addr",
    "snapshot_id",
    "offset",
    "data",
    "vote_granted",
    "Ok",
    "Err",
    "Success",
    "PartialSuccess",
    "Conflict",
    "HigherVote",
    "Fatal",
    "APIError",
    "Stopped",
    "Panicked",
];

fn word() -> BoxedStrategy<String> {
    prop_oneof![4 => select(WORDS).prop_map(String::from), 1 => any::<String>()].boxed()
}

/// Arbitrary JSON made of the encodings' vocabulary: deep enough to get past the outer shape.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => (0u64..8).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        2 => word().prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            1 => vec(inner.clone(), 0..6).prop_map(Value::Array),
            2 => vec((word(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Raw bytes, JSON-ish byte soup, or generated JSON.
fn hostile_json_bytes() -> BoxedStrategy<Vec<u8>> {
    const SOUP: &[u8] = b"{}[]\":,0123456789-+eE.nultrfas\\ \n";
    prop_oneof![
        1 => vec(any::<u8>(), 0..512),
        1 => vec(select(SOUP), 0..256),
        3 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        // One variant name around arbitrary JSON: the shape of an externally tagged enum.
        2 => (select(WORDS), json_value()).prop_map(|(k, v)| {
            let tagged = Value::Object([(k.to_string(), v)].into_iter().collect());
            serde_json::to_vec(&tagged).unwrap_or_default()
        }),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the properties.
// ---------------------------------------------------------------------------------------------

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// A decoded value encodes, and that encoding decodes back to the same value.
fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(
    v: &T,
) -> Result<(), TestCaseError> {
    let bytes = serde_json::to_vec(v).map_err(|e| fail(format!("cannot re-encode: {e}")))?;
    let back: T = serde_json::from_slice(&bytes)
        .map_err(|e| fail(format!("the re-encoding does not decode: {e}")))?;
    prop_assert_eq!(&back, v);
    Ok(())
}

/// For openraft types without `PartialEq`: decoding the re-encoding gives the same encoding.
fn reencodes_stably<T: Serialize + DeserializeOwned>(v: &T) -> Result<(), TestCaseError> {
    let once = serde_json::to_vec(v).map_err(|e| fail(format!("cannot re-encode: {e}")))?;
    let back: T = serde_json::from_slice(&once)
        .map_err(|e| fail(format!("the re-encoding does not decode: {e}")))?;
    let twice = serde_json::to_vec(&back).map_err(|e| fail(format!("cannot re-encode: {e}")))?;
    prop_assert_eq!(
        String::from_utf8_lossy(&once),
        String::from_utf8_lossy(&twice)
    );
    Ok(())
}

/// Decodes `bytes` as `T`; a value must re-encode stably. Errors are the expected outcome.
fn decode_stably<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
) -> Result<Option<T>, TestCaseError> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(v) => {
            reencodes_stably(&v)?;
            Ok(Some(v))
        }
        Err(_) => Ok(None),
    }
}

/// A cluster a few steps into its life: three registered members, a primary with a committed
/// synchronous standby and a planned switchover, so that commands get past "no primary yet".
fn seeded() -> (ClusterState, BTreeSet<u64>) {
    let members: BTreeSet<u64> = (1..=3).collect();
    let mut st = ClusterState::default();
    let mut run = |cmd: Command| {
        assert_eq!(
            st.apply(&cmd, &members),
            CommandOutcome::Applied,
            "seeding {cmd:?}"
        );
    };
    for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
        run(Command::RegisterMember(MemberInfo {
            id,
            name: name.into(),
            pg_host: "127.0.0.1".into(),
            pg_port: 5432,
            raft_heartbeat_ms: 150,
            raft_election_max_ms: 600,
            ..Default::default()
        }));
    }
    let standby = SyncSet {
        members: [2].into(),
        k: 1,
    };
    run(Command::Promote {
        node: 1,
        epoch: 1,
        reason: "bootstrap".into(),
        at_unix_ms: 1,
        lsn: Some(42),
        sync: standby.clone(),
    });
    run(Command::CommitSync {
        epoch: 1,
        set: standby,
    });
    run(Command::PlanPrimary {
        plan: PrimaryPlan {
            id: 0,
            kind: PlanKind::Switchover,
            epoch: 1,
            from: 1,
            to: 3,
            not_before_unix_ms: 0,
            requested_at_unix_ms: 5,
            started: false,
        },
    });
    (st, members)
}

/// Applies `cmd` and checks what `ClusterState::apply` promises for states the log can reach: a
/// rejection changes nothing, the history stays bounded, the configuration stays valid.
fn apply_checked(
    st: &mut ClusterState,
    cmd: &Command,
    members: &BTreeSet<u64>,
) -> Result<(), TestCaseError> {
    let before = st.clone();
    if let CommandOutcome::Rejected { reason } = st.apply(cmd, members) {
        prop_assert!(!reason.is_empty(), "{:?} rejected without a reason", cmd);
        prop_assert_eq!(&*st, &before, "the rejected {:?} changed the state", cmd);
    }
    prop_assert!(st.history.len() <= HISTORY_LIMIT);
    prop_assert!(
        st.config.validate().is_ok(),
        "{:?} left an invalid configuration {:?}",
        cmd,
        st.config
    );
    Ok(())
}

/// What the state machine does with a log entry: the real per-entry logic.
fn apply_entry(state: &mut AppliedState, entry: Entry<TypeConfig>) {
    state.apply_entry(entry);
}

fn seeded_applied() -> AppliedState {
    let (cluster, members) = seeded();
    let membership = Membership::new(vec![members], ());
    AppliedState {
        last_applied: None,
        membership: StoredMembership::new(None, membership),
        cluster,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Commands and the Raft transport.
// ---------------------------------------------------------------------------------------------

fn log_id() -> BoxedStrategy<LogId<u64>> {
    (number(), node_id(), number())
        .prop_map(|(term, node, index)| LogId::new(CommittedLeaderId::new(term, node), index))
        .boxed()
}

fn vote() -> BoxedStrategy<Vote<u64>> {
    (number(), node_id(), any::<bool>())
        .prop_map(|(term, node, committed)| {
            if committed {
                Vote::new_committed(term, node)
            } else {
                Vote::new(term, node)
            }
        })
        .boxed()
}

fn membership() -> BoxedStrategy<Membership<u64, BasicNode>> {
    (
        vec(btree_set(node_id(), 0..5), 1..3),
        btree_map(node_id(), text().prop_map(BasicNode::new), 0..5),
    )
        .prop_map(|(configs, nodes)| Membership::new(configs, nodes))
        .boxed()
}

fn entry() -> BoxedStrategy<Entry<TypeConfig>> {
    (
        log_id(),
        prop_oneof![
            1 => Just(EntryPayload::<TypeConfig>::Blank),
            6 => command().prop_map(EntryPayload::Normal),
            1 => membership().prop_map(EntryPayload::Membership),
        ],
    )
        .prop_map(|(log_id, payload)| Entry { log_id, payload })
        .boxed()
}

fn append_entries() -> BoxedStrategy<AppendEntriesRequest<TypeConfig>> {
    (
        vote(),
        proptest::option::of(log_id()),
        vec(entry(), 0..6),
        proptest::option::of(log_id()),
    )
        .prop_map(
            |(vote, prev_log_id, entries, leader_commit)| AppendEntriesRequest {
                vote,
                prev_log_id,
                entries,
                leader_commit,
            },
        )
        .boxed()
}

fn install_snapshot() -> BoxedStrategy<InstallSnapshotRequest<TypeConfig>> {
    let snapshot_data = prop_oneof![
        3 => vec(runnable_command(), 0..8).prop_map(|cmds| {
            let (mut st, members) = seeded();
            for c in &cmds {
                st.apply(c, &members);
            }
            serde_json::to_vec(&st).unwrap_or_default()
        }),
        1 => vec(any::<u8>(), 0..64),
    ];
    (
        (vote(), proptest::option::of(log_id())),
        (proptest::option::of(log_id()), membership(), text()),
        (number(), snapshot_data, any::<bool>()),
    )
        .prop_map(
            |((vote, last_log_id), (membership_log_id, m, snapshot_id), (offset, data, done))| {
                InstallSnapshotRequest {
                    vote,
                    meta: SnapshotMeta {
                        last_log_id,
                        last_membership: StoredMembership::new(membership_log_id, m),
                        snapshot_id,
                    },
                    offset,
                    data,
                    done,
                }
            },
        )
        .boxed()
}

/// Decodes `bytes` as every payload a peer sends over the Raft transport (and every reply the
/// client half decodes), and applies whatever decodes the way the node would.
fn feed_transport(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Some(req) = decode_stably::<AppendEntriesRequest<TypeConfig>>(bytes)? {
        let mut state = seeded_applied();
        for entry in req.entries {
            apply_entry(&mut state, entry);
        }
        round_trips(&state.cluster)?;
    }
    decode_stably::<VoteRequest<u64>>(bytes)?;
    if let Some(req) = decode_stably::<InstallSnapshotRequest<TypeConfig>>(bytes)? {
        feed_snapshot(&req.data)?;
    }
    decode_stably::<Result<AppendEntriesResponse<u64>, RaftError<u64>>>(bytes)?;
    decode_stably::<Result<VoteResponse<u64>, RaftError<u64>>>(bytes)?;
    decode_stably::<Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>>(
        bytes,
    )?;
    Ok(())
}

/// Decodes snapshot data as `install_snapshot` does; a decoded state must round-trip. (What
/// the state machine then applies to it is exercised by the transport properties.)
fn feed_snapshot(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(state) = serde_json::from_slice::<ClusterState>(bytes) {
        round_trips(&state)?;
    }
    Ok(())
}

/// Decodes `bytes` as a log entry's command; a command must round-trip, and applying it to a
/// new cluster and to a running one must not panic.
fn feed_command(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(cmd) = serde_json::from_slice::<Command>(bytes) else {
        return Ok(());
    };
    round_trips(&cmd)?;
    let mut fresh = ClusterState::default();
    apply_checked(&mut fresh, &cmd, &(1..=3).collect())?;
    let (mut running, members) = seeded();
    apply_checked(&mut running, &cmd, &members)?;
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_config(1))]

    /// Arbitrary bytes and vocabulary-built JSON as a log entry's `Command`: a follower decodes
    /// whatever a (possibly buggy or hostile) leader replicated.
    #[test]
    fn command_decoder_survives_hostile_bytes(bytes in hostile_json_bytes()) {
        feed_command(&bytes)?;
    }

    /// Valid command encodings with bytes flipped, inserted, deleted or numbers pushed out of
    /// range: near-valid input gets furthest into the decoder and then into `apply`.
    #[test]
    fn command_decoder_survives_mutated_encodings(cmd in command(), edits in edits()) {
        let valid = serde_json::to_vec(&cmd).map_err(fail)?;
        feed_command(&mutate(valid, &edits))?;
    }

    /// Arbitrary bytes as every Raft transport payload: any peer that reaches the gRPC port can
    /// send them.
    #[test]
    fn raft_transport_decoders_survive_hostile_bytes(bytes in hostile_json_bytes()) {
        feed_transport(&bytes)?;
    }

    /// Arbitrary bytes as the snapshot data `install_snapshot` decodes into the cluster state.
    #[test]
    fn snapshot_decoder_survives_hostile_bytes(bytes in hostile_json_bytes()) {
        feed_snapshot(&bytes)?;
    }
}

proptest! {
    #![proptest_config(fuzz_config(4))]

    /// Mutated AppendEntries, Vote and InstallSnapshot requests; decoded entries are applied to
    /// a running cluster the way the state machine applies them, memberships included (this
    /// also reached the lease-floor overflow, through entries that register a member with a
    /// huge Raft timing and then change a setting).
    #[test]
    fn raft_transport_decoders_survive_mutated_requests(
        append in append_entries(),
        vote_req in (vote(), proptest::option::of(log_id())),
        snapshot in install_snapshot(),
        which in 0u8..3,
        edits in edits(),
    ) {
        let valid = match which {
            0 => serde_json::to_vec(&append),
            1 => serde_json::to_vec(&VoteRequest::new(vote_req.0, vote_req.1)),
            _ => serde_json::to_vec(&snapshot),
        }
        .map_err(fail)?;
        feed_transport(&mutate(valid, &edits))?;
    }

    /// Mutated snapshots of states the log can reach: a follower that lags installs whatever
    /// state the leader sends.
    #[test]
    fn snapshot_decoder_survives_mutated_states(
        cmds in vec(runnable_command(), 0..8),
        edits in edits(),
    ) {
        let (mut st, members) = seeded();
        for c in &cmds {
            st.apply(c, &members);
        }
        feed_snapshot(&mutate(serde_json::to_vec(&st).map_err(fail)?, &edits))?;
    }

    /// Sequences of structurally valid but arbitrary commands applied to a new and to a running
    /// cluster: decoding is only half of the way in, `apply` must hold for whatever decodes.
    /// Each state reached must also survive a snapshot (encode, decode).
    //
    // This property found a `RegisterMember` with a huge `raft_heartbeat_ms` or
    // `raft_election_max_ms` after which every `SetConfig` of a pgquorum setting overflowed in
    // `lease_floor_ms` inside `apply`; see
    // `absurd_registered_timings_do_not_overflow_the_lease_floor` below.
    #[test]
    fn applying_arbitrary_command_sequences_never_panics(
        members in raft_members(),
        from_seeded in any::<bool>(),
        cmds in vec(command(), 1..24),
    ) {
        let (mut st, members) = if from_seeded {
            seeded()
        } else {
            (ClusterState::default(), members)
        };
        for cmd in &cmds {
            apply_checked(&mut st, cmd, &members)?;
        }
        round_trips(&st)?;
    }
}

/// The inputs the command-sequence property shrank to, kept as a regression test. A committed
/// registration may carry any Raft timings (the RPC now bounds them, but the log must apply
/// what it holds), and the next `config set` of a pgquorum setting used to panic in
/// `lease_floor_ms` on every member that applied the entry; it saturates now.
#[test]
fn absurd_registered_timings_do_not_overflow_the_lease_floor() {
    let members: BTreeSet<u64> = [1].into();
    for (raft_heartbeat_ms, raft_election_max_ms) in
        [(150, u64::MAX / 2 + 1), (9_223_372_036_854_775_533, 150)]
    {
        let mut st = ClusterState::default();
        let register = Command::RegisterMember(MemberInfo {
            id: 1,
            name: "a".into(),
            raft_heartbeat_ms,
            raft_election_max_ms,
            ..Default::default()
        });
        assert_eq!(st.apply(&register, &members), CommandOutcome::Applied);
        let set = Command::SetConfig {
            changes: [("failover_min_free_bytes".to_string(), "0".to_string())].into(),
        };
        let members = members.clone();
        let outcome = std::panic::catch_unwind(move || st.apply(&set, &members));
        assert!(
            outcome.is_ok(),
            "ClusterState::apply panicked on a SetConfig after a RegisterMember with \
             raft_heartbeat_ms = {raft_heartbeat_ms}, raft_election_max_ms = \
             {raft_election_max_ms}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Members' reports.
// ---------------------------------------------------------------------------------------------

/// Text around the 1024-byte limit of report fields, or anything.
fn report_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => text(),
        1 => (1000usize..1100).prop_map(|n| "x".repeat(n)),
        1 => (300usize..400).prop_map(|n| "é€".repeat(n)),
    ]
    .boxed()
}

fn proto_report() -> BoxedStrategy<proto::MemberReport> {
    let pg = prop_oneof![6 => 0i32..8, 1 => any::<i32>()];
    let head = (
        node_id(),
        pg,
        any::<u32>(),
        any::<u32>(),
        number(),
        any::<bool>(),
        proptest::option::of(number()),
        proptest::option::of(node_id()),
    );
    let sync_applied = proptest::option::of(
        (
            number(),
            proptest::option::of((
                vec(node_id(), 0..40),
                prop_oneof![3 => 0u32..40, 1 => any::<u32>()],
            )),
            any::<bool>(),
            number(),
        )
            .prop_map(|(epoch, set, confirmed, revision)| proto::SyncApplied {
                epoch,
                set: set.map(|(members, k)| proto::SyncSet { members, k }),
                confirmed,
                revision,
            }),
    );
    let middle = (
        sync_applied,
        proptest::option::of((number(), number())),
        number(),
        number(),
    );
    let storage = proptest::option::of(
        (
            proptest::option::of(number()),
            any::<bool>(),
            proptest::option::of(report_text()),
            any::<u32>(),
            any::<bool>(),
            proptest::option::of(number()),
        )
            .prop_map(
                |(
                    free_bytes,
                    low_space,
                    cannot_write,
                    write_failures,
                    read_only,
                    write_probe_ms,
                )| {
                    proto::StorageReport {
                        free_bytes,
                        low_space,
                        cannot_write,
                        write_failures,
                        read_only,
                        write_probe_ms,
                    }
                },
            ),
    );
    let tail = (
        storage,
        proptest::option::of(number()),
        proptest::option::of((number(), number())),
        prop_oneof![3 => vec(text(), 0..4), 1 => vec("[a-z_]{1,12}", 60..70), 1 => vec(report_text(), 0..3)],
        proptest::option::of(number()),
        any::<(bool, bool)>(),
    );
    (head, middle, tail)
        .prop_map(
            |(
                (
                    node,
                    pg,
                    consecutive_failures,
                    timeline,
                    lsn,
                    streaming,
                    wal_receipt_age_ms,
                    upstream,
                ),
                (sync_applied, leader_stamp, epoch_seen, sent_at),
                (
                    storage,
                    replayed_lsn,
                    handed_over,
                    pending_restart,
                    system_identifier,
                    (unguarded, lsn_incomplete),
                ),
            )| proto::MemberReport {
                node,
                pg,
                consecutive_failures,
                timeline,
                lsn,
                streaming,
                wal_receipt_age_ms,
                upstream,
                sync_applied,
                leader_stamp: leader_stamp.map(|(term, at)| proto::LeaderStamp { term, at }),
                epoch_seen,
                sent_at,
                storage,
                replayed_lsn,
                handed_over: handed_over
                    .map(|(plan, final_lsn)| proto::HandedOver { plan, final_lsn }),
                pending_restart,
                system_identifier,
                unguarded,
                lsn_incomplete,
            },
        )
        .boxed()
}

/// Converts a wire report as the Internal service does; an accepted report must respect the
/// limits the conversion promises, survive the wire unchanged, and be filed in the leader's
/// book without a panic.
fn feed_report(
    wire: proto::MemberReport,
    book: &mut ReportBook,
    clock: (u64, Option<u64>, u64),
) -> Result<(), TestCaseError> {
    let (at, granted_sent_at, wal_fresh_ms) = clock;
    let r = match MemberReport::try_from(wire) {
        Err(reason) => {
            prop_assert!(!reason.is_empty());
            return Ok(());
        }
        Ok(r) => r,
    };
    prop_assert!(r.node != 0);
    prop_assert!(r.upstream != Some(0));
    prop_assert!(r.pending_restart.len() <= 64);
    prop_assert!(r.pending_restart.iter().all(|p| p.len() <= 1024));
    prop_assert!(r
        .storage
        .cannot_write
        .as_ref()
        .is_none_or(|c| c.len() <= 1024));
    prop_assert!(r
        .sync_applied
        .as_ref()
        .is_none_or(|s| s.set.members.len() <= 16));
    let again = MemberReport::try_from(proto::MemberReport::from(&r));
    prop_assert_eq!(again.as_ref(), Ok(&r));
    let _ = (
        r.healthy_replica(),
        r.receives_wal_now(wal_fresh_ms),
        r.cannot_write_for(r.consecutive_failures),
    );
    record(book, r, at, granted_sent_at, wal_fresh_ms);
    Ok(())
}

fn clock() -> impl Strategy<Value = (u64, Option<u64>, u64)> {
    (number(), proptest::option::of(number()), number())
}

proptest! {
    #![proptest_config(fuzz_config(2))]

    /// Proto reports with every field arbitrary: enum values out of range, huge numbers, long
    /// texts, oversized synchronous sets. Any member (or anyone reaching the port) sends them.
    //
    // This property found a synchronous set with repeated ids that passed the size check on
    // the wire list and no longer converted once deduplicated; see
    // `a_report_taken_from_the_wire_converts_back_into_one_that_is_taken` below.
    #[test]
    fn report_conversion_survives_arbitrary_fields(
        reports in vec(proto_report(), 1..4),
        clock in clock(),
    ) {
        let mut book = ReportBook::new();
        for wire in reports {
            feed_report(wire, &mut book, clock)?;
        }
    }
}

/// The input the report property shrank to, kept as a regression test: `MemberReport::try_from`
/// once bounded `k` by the wire's member list before it became a set, so 11 copies of one id
/// with `k = 18` passed, and the report it made was refused when sent again. The bound now
/// counts distinct members, and member id 0 is refused as it is for `upstream`.
#[test]
fn a_report_taken_from_the_wire_converts_back_into_one_that_is_taken() {
    let wire = |members: Vec<u64>, k: u32| proto::MemberReport {
        node: 1,
        pg: proto::PgRole::Primary.into(),
        sync_applied: Some(proto::SyncApplied {
            epoch: 0,
            set: Some(proto::SyncSet { members, k }),
            confirmed: false,
            revision: 0,
        }),
        ..Default::default()
    };
    assert!(MemberReport::try_from(wire(vec![0; 11], 18)).is_err());
    assert!(MemberReport::try_from(wire(vec![2; 11], 18)).is_err());
    let accepted = MemberReport::try_from(wire(vec![2, 2, 3], 1)).expect("a sane set");
    let again = MemberReport::try_from(proto::MemberReport::from(&accepted));
    assert_eq!(
        again,
        Ok(accepted),
        "an accepted report no longer converts once re-encoded"
    );
}

proptest! {
    #![proptest_config(fuzz_config(1))]

    /// Arbitrary bytes decoded as a `ReportRequest` by prost, then converted.
    #[test]
    fn report_request_decoder_survives_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..512),
        clock in clock(),
    ) {
        if let Ok(req) = proto::ReportRequest::decode(bytes.as_slice()) {
            if let Some(wire) = req.report {
                feed_report(wire, &mut ReportBook::new(), clock)?;
            }
        }
    }

    /// Valid `ReportRequest` encodings with protobuf bytes mutated: tags, lengths and varints
    /// that are almost right.
    #[test]
    fn report_request_decoder_survives_mutated_encodings(
        wire in proto_report(),
        edits in edits(),
        clock in clock(),
    ) {
        let valid = proto::ReportRequest { report: Some(wire) }.encode_to_vec();
        let bytes = mutate(valid, &edits);
        if let Ok(req) = proto::ReportRequest::decode(bytes.as_slice()) {
            if let Some(wire) = req.report {
                feed_report(wire, &mut ReportBook::new(), clock)?;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The node config and the dynamic config.
// ---------------------------------------------------------------------------------------------

/// Every section and most keys of `node.toml`, valid as a whole (passwords inline: `parse`
/// reads no files).
const VALID_CONFIG: &str = r#"
cluster_name = "main"
node_id = 1
name = "pg1"
data_dir = "/var/lib/pgquorum"
listen_addr = "10.0.0.11:7001"
advertise_addr = "pg1.example:7001"
http_addr = "10.0.0.11:8008"

[postgres]
host = "10.0.0.11"
port = 5432
data_dir = "/var/lib/postgresql/15/pgquorum"
bin_dir = "/usr/lib/postgresql/15/bin"
os_user = "postgres"
socket_dir = "/var/run/postgresql"
superuser = "postgres"
superuser_password = "su-secret"
replication_user = "replicator"
replication_password = "repl-secret"
allowed_cidrs = ["10.0.0.0/24", "pg2.example"]
free_space_warn_bytes = 1073741824
restart_window_ms = 30000

[tags]
nofailover = false
priority = 0
nosync = false

[raft]
heartbeat_ms = 150
election_timeout_min_ms = 400
election_timeout_max_ms = 600
snapshot_every = 1000
logs_to_keep = 200

[dial_via]
"pg2.example:7001" = "127.0.0.1:17002"

[callbacks]
on_start = "/usr/local/bin/on-start"
timeout_ms = 10000

[security]
ca_file = "/etc/pgquorum/ca.crt"
cert_file = "/etc/pgquorum/node.crt"
key_file = "/etc/pgquorum/node.key"
token_file = "/etc/pgquorum/operator.token"
open_reads = false
metrics_token_file = "/etc/pgquorum/metrics.token"

[[initial_members]]
id = 1
addr = "pg1.example:7001"

[[initial_members]]
id = 2
addr = "pg2.example:7001"
"#;

const CONFIG_KEYS: &[&str] = &[
    "cluster_name",
    "node_id",
    "name",
    "data_dir",
    "listen_addr",
    "advertise_addr",
    "http_addr",
    "host",
    "port",
    "bin_dir",
    "os_user",
    "socket_dir",
    "superuser",
    "superuser_password",
    "superuser_password_file",
    "replication_user",
    "replication_password",
    "allowed_cidrs",
    "free_space_warn_bytes",
    "restart_window_ms",
    "nofailover",
    "priority",
    "heartbeat_ms",
    "election_timeout_min_ms",
    "election_timeout_max_ms",
    "snapshot_every",
    "logs_to_keep",
    "on_start",
    "timeout_ms",
    "insecure",
    "ca_file",
    "cert_file",
    "key_file",
    "open_reads",
    "id",
    "addr",
    "\"127.0.0.1:7002\"",
];

const CONFIG_SECTIONS: &[&str] = &[
    "[postgres]",
    "[tags]",
    "[raft]",
    "[dial_via]",
    "[callbacks]",
    "[security]",
    "[[initial_members]]",
    "[raft.x]",
    "[[raft]]",
];

const TOML_VALUES: &[&str] = &[
    "\"demo\"",
    "\"\"",
    "\"127.0.0.1:7001\"",
    "\"[::1]:7001\"",
    "\":7001\"",
    "\"host:0\"",
    "\"/\"",
    "1",
    "0",
    "-1",
    "150",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "1.5",
    "inf",
    "nan",
    "true",
    "[]",
    "[1, \"a\"]",
    "{}",
    "{ id = 1 }",
    "1979-05-27T07:32:00Z",
    "'''\nx'''",
];

/// Lines of `key = value` and section headers from the config's vocabulary, mixed with junk.
fn toml_like() -> BoxedStrategy<String> {
    vec(
        prop_oneof![
            4 => (select(CONFIG_KEYS), prop_oneof![select(TOML_VALUES).prop_map(String::from), any::<String>().prop_map(|s| format!("{s:?}"))])
                .prop_map(|(k, v)| format!("{k} = {v}")),
            1 => select(CONFIG_SECTIONS).prop_map(String::from),
            1 => any::<String>(),
        ],
        0..30,
    )
    .prop_map(|lines| lines.join("\n"))
    .boxed()
}

/// Parses `text` as `node.toml` with no environment; a config that parses must satisfy the
/// rules the validator enforces, whatever the input did to get there.
fn feed_node_config(text: &str) -> Result<(), TestCaseError> {
    let cfg = match NodeConfig::parse_with_env(text, Path::new("node.toml"), &|_: &str| None) {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            return Ok(());
        }
        Ok(cfg) => cfg,
    };
    prop_assert!(cfg.node_id != 0);
    prop_assert!(!cfg.name.trim().is_empty());
    prop_assert!(!cfg.cluster_name.is_empty());
    prop_assert!(cfg.listen_addr.parse::<SocketAddr>().is_ok());
    prop_assert!(cfg.postgres.port != 0);
    let r = &cfg.raft;
    prop_assert!(r.heartbeat_ms >= 20);
    prop_assert!(r.election_timeout_min_ms > r.heartbeat_ms.saturating_mul(2));
    prop_assert!(r.election_timeout_max_ms > r.election_timeout_min_ms);
    prop_assert!(r.snapshot_every > 0);
    if !cfg.initial_members.is_empty() {
        prop_assert!(cfg
            .initial_members
            .iter()
            .any(|m| m.id == cfg.node_id && m.addr == cfg.advertised()));
        let ids: BTreeSet<u64> = cfg.initial_members.iter().map(|m| m.id).collect();
        prop_assert_eq!(ids.len(), cfg.initial_members.len());
    }
    Ok(())
}

#[test]
fn the_valid_config_the_mutations_start_from_parses() {
    let cfg = NodeConfig::parse_with_env(VALID_CONFIG, Path::new("node.toml"), &|_: &str| None);
    assert!(cfg.is_ok(), "{:?}", cfg.err());
}

/// Checks a change set as `config set` does: refused with a reason, or accepted and then
/// reproduced exactly by re-applying the resulting settings as text.
fn feed_changes(changes: &BTreeMap<String, String>) -> Result<(), TestCaseError> {
    let base = DynamicConfig::default();
    match base.with_changes(changes) {
        Err(e) => prop_assert!(!e.to_string().is_empty()),
        Ok(next) => {
            prop_assert!(next.validate().is_ok());
            prop_assert_eq!(base.with_changes(&next.to_map()), Ok(next.clone()));
        }
    }
    let (st, _) = seeded();
    match st.split_changes(changes) {
        Err(e) => prop_assert!(!e.is_empty()),
        Ok((pg, rest)) => {
            let again = PgSettings::default().with_changes(&pg.to_map());
            prop_assert_eq!(again, Ok(pg));
            if !rest.is_empty() {
                prop_assert!(st.config_after(&rest).is_ok());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_config(1))]

    /// Arbitrary text and vocabulary-built TOML as `node.toml`: an operator's typo must come
    /// back as an error naming the problem, never as a crash at start-up.
    #[test]
    fn node_config_parser_survives_hostile_text(
        text in prop_oneof![1 => any::<String>(), 3 => toml_like()],
    ) {
        feed_node_config(&text)?;
    }

    /// Mutations of a valid `node.toml`: values out of range, broken quoting, duplicated and
    /// dropped lines, sections that appear twice.
    #[test]
    fn node_config_parser_survives_mutated_configs(edits in edits()) {
        let bytes = mutate(VALID_CONFIG.as_bytes().to_vec(), &edits);
        feed_node_config(&String::from_utf8_lossy(&bytes))?;
    }

    /// `config set` change sets: known keys with hostile values, Postgres parameters and
    /// `pg_hba` lines, unknown keys. The CLI sends them as given, and the leader validates them
    /// before they become a log entry.
    #[test]
    fn dynamic_config_changes_are_refused_or_reproducible(changes in changes()) {
        feed_changes(&changes)?;
    }

    /// Arbitrary JSON as the stored dynamic configuration (part of every snapshot, and of
    /// states written by older versions).
    #[test]
    fn dynamic_config_decoder_survives_hostile_bytes(bytes in hostile_json_bytes()) {
        if let Ok(cfg) = serde_json::from_slice::<DynamicConfig>(&bytes) {
            round_trips(&cfg)?;
        }
    }
}
