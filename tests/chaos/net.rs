//! The two ways the partition suite breaks links between members, behind one interface:
//!
//! - [`Net::Netns`]: every member in a network namespace of its own on a private bridge, cuts as
//!   nftables drop rules, so every connection between two members is cut, including the ones
//!   libpq opens itself for replication. Root only.
//! - [`Net::Toxi`]: every member on loopback, and every directed link through a Toxiproxy proxy
//!   of its own: member `a` reaches member `b`'s gRPC (Raft and the API) and `b`'s Postgres
//!   through proxies `a→b`, which `a`'s `[dial_via]` names; the test's clients reach each
//!   member's Postgres through a proxy too. A cut is a `timeout` toxic with `timeout: 0` (silence,
//!   like a real cut); a disabled proxy refuses and closes connections (like a crash); latency and
//!   bandwidth are toxics of their own. Runs anywhere.
//!
//! A cut "from `a` to `b`" drops what `a` sends to `b`, whichever side opened the connection,
//! so both backends cut the same traffic.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pgquorum_toxiproxy::{
    connect_or_start, Backend as ToxiBackend, Client, Stream, Toxic, ToxicKind,
};

use crate::harness::Placement;
use crate::netns::Netns;

/// gRPC and Postgres ports of members in namespaces: every member has an address of its own,
/// so all use the same ports.
pub const NETNS_GRPC_PORT: u16 = 7000;
/// See [`NETNS_GRPC_PORT`].
pub const NETNS_PG_PORT: u16 = 5432;

/// Which connections between two members a fault touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Link {
    /// Everything.
    All,
    /// The sidecars' gRPC: Raft messages, reports, forwarded API calls.
    Raft,
    /// Postgres: replication, pg_rewind, clones.
    Postgres,
}

impl Link {
    fn kinds(self) -> &'static [Kind] {
        match self {
            Link::All => &[Kind::Grpc, Kind::Pg],
            Link::Raft => &[Kind::Grpc],
            Link::Postgres => &[Kind::Pg],
        }
    }
}

/// The two services of a member that peers connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Grpc,
    Pg,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Grpc => "grpc",
            Kind::Pg => "pg",
        }
    }
}

/// Who opens a proxied connection: a member, or the test's clients.
const CLIENT: u64 = 0;

/// A test cluster's network and the faults injected into it.
pub enum Net {
    /// Namespaces and nftables.
    Netns(Netns),
    /// Loopback and one Toxiproxy proxy per directed link.
    Toxi(Box<ToxiNet>),
}

impl Net {
    /// The backend's name in reports.
    pub fn backend(&self) -> &'static str {
        match self {
            Net::Netns(_) => "netns",
            Net::Toxi(_) => "toxiproxy",
        }
    }

    /// Drops what member `from` sends to member `to` on `link`.
    pub async fn cut_one_way(&self, from: u64, to: u64, link: Link) {
        match self {
            Net::Netns(n) => {
                let r = match link {
                    Link::All => n.cut_one_way(from, to),
                    Link::Raft => n.cut_port_one_way(from, to, NETNS_GRPC_PORT),
                    Link::Postgres => n.cut_port_one_way(from, to, NETNS_PG_PORT),
                };
                r.unwrap_or_else(|e| panic!("nft cut {from} -> {to}: {e}"));
            }
            Net::Toxi(t) => t.cut_one_way(from, to, link).await,
        }
    }

    /// Drops everything between `a` and `b` on `link`, both ways.
    pub async fn cut(&self, a: u64, b: u64, link: Link) {
        self.cut_one_way(a, b, link).await;
        self.cut_one_way(b, a, link).await;
    }

    /// Cuts every link between different groups, both ways.
    pub async fn split(&self, groups: &[&[u64]]) {
        for (i, g) in groups.iter().enumerate() {
            for h in &groups[i + 1..] {
                for a in g.iter() {
                    for b in h.iter() {
                        self.cut(*a, *b, Link::All).await;
                    }
                }
            }
        }
    }

    /// Removes every fault: cuts, toxics, disabled proxies.
    pub async fn heal(&self) {
        match self {
            Net::Netns(n) => n.heal().unwrap_or_else(|e| panic!("nft heal: {e}")),
            Net::Toxi(t) => t.heal().await,
        }
    }

    /// The faults in force, as the backend shows them (nft counters, or the proxies' toxics).
    pub async fn describe(&self) -> String {
        match self {
            Net::Netns(n) => n.rules(),
            Net::Toxi(t) => t.describe().await,
        }
    }

    /// The Toxiproxy network, for the faults only proxies can make.
    pub fn toxi(&self) -> Option<&ToxiNet> {
        match self {
            Net::Toxi(t) => Some(t.as_ref()),
            Net::Netns(_) => None,
        }
    }
}

/// Loopback members joined by one Toxiproxy proxy per directed link.
pub struct ToxiNet {
    client: Client,
    /// Keeps the server (a child process or our own) alive as long as the proxies are used.
    server: ToxiBackend,
    /// Proxy name of each (from, to, kind); `from` is [`CLIENT`] for the test's clients.
    proxies: BTreeMap<(u64, u64, Kind), String>,
    /// The proxies' listen addresses, by name.
    listen: BTreeMap<String, String>,
    /// Toxics this net added, as (proxy, toxic name), so a heal removes exactly those.
    added: Mutex<Vec<(String, String)>>,
}

impl ToxiNet {
    /// Creates the proxies for members at `placements` (on loopback): between every ordered pair
    /// of members, gRPC and Postgres, and from the test's clients to every member's Postgres.
    pub async fn build(placements: &BTreeMap<u64, Placement>) -> Result<ToxiNet, String> {
        let (client, server) = connect_or_start()
            .await
            .map_err(|e| format!("no Toxiproxy server: {e}"))?;
        // Names are unique on a server another test (or a user's other work) may share.
        static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let prefix = format!(
            "pgq{}x{}",
            std::process::id(),
            BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut net = ToxiNet {
            client,
            server,
            proxies: BTreeMap::new(),
            listen: BTreeMap::new(),
            added: Mutex::new(Vec::new()),
        };
        for (to, p) in placements {
            let froms = placements
                .keys()
                .copied()
                .filter(|f| f != to)
                .chain([CLIENT]);
            for from in froms {
                for kind in [Kind::Grpc, Kind::Pg] {
                    let upstream = match kind {
                        Kind::Grpc => format!("{}:{}", p.host, p.port),
                        Kind::Pg => format!("{}:{}", p.host, p.pg_port),
                    };
                    let name = format!("{prefix}-n{from}-n{to}-{}", kind.label());
                    let proxy = net
                        .client
                        .create_proxy(&name, "127.0.0.1:0", &upstream)
                        .await
                        .map_err(|e| format!("create proxy {name}: {e}"))?;
                    net.listen.insert(name.clone(), proxy.listen);
                    net.proxies.insert((from, *to, kind), name);
                }
            }
        }
        Ok(net)
    }

    /// Which server the proxies run on.
    pub fn server(&self) -> String {
        self.server.describe()
    }

    fn name(&self, from: u64, to: u64, kind: Kind) -> &str {
        self.proxies
            .get(&(from, to, kind))
            .unwrap_or_else(|| panic!("no proxy {from} -> {to} {kind:?}"))
    }

    fn addr(&self, from: u64, to: u64, kind: Kind) -> &str {
        &self.listen[self.name(from, to, kind)]
    }

    /// The `[dial_via]` table of member `from`: each peer's advertised gRPC and Postgres
    /// address, reached through `from`'s own proxies to that peer.
    pub fn dial_via(&self, from: u64, placements: &BTreeMap<u64, Placement>) -> String {
        let mut s = String::from("\n[dial_via]\n");
        for (to, p) in placements.iter().filter(|(to, _)| **to != from) {
            s.push_str(&format!(
                "\"{}:{}\" = \"{}\"\n\"{}:{}\" = \"{}\"\n",
                p.host,
                p.port,
                self.addr(from, *to, Kind::Grpc),
                p.host,
                p.pg_port,
                self.addr(from, *to, Kind::Pg)
            ));
        }
        s
    }

    /// Where the test's clients reach member `to`'s Postgres.
    pub fn client_pg_addr(&self, to: u64) -> &str {
        self.addr(CLIENT, to, Kind::Pg)
    }

    async fn add(&self, proxy: &str, toxic: Toxic) {
        let name = toxic.name.clone();
        self.client
            .add_toxic(proxy, &toxic)
            .await
            .unwrap_or_else(|e| panic!("add toxic {name} to {proxy}: {e}"));
        self.added
            .lock()
            .expect("toxics list")
            .push((proxy.to_string(), name));
    }

    /// Adds `kind` to what `from` sends to `to` on `link`: upstream on `from`'s proxies to
    /// `to`, downstream on `to`'s proxies to `from`. `tag` names the toxics.
    pub async fn one_way(&self, from: u64, to: u64, link: Link, tag: &str, kind: ToxicKind) {
        for k in link.kinds() {
            let up = self.name(from, to, *k).to_string();
            let down = self.name(to, from, *k).to_string();
            self.add(
                &up,
                Toxic::new(format!("{tag}-up"), Stream::Upstream, kind.clone()),
            )
            .await;
            self.add(
                &down,
                Toxic::new(format!("{tag}-down"), Stream::Downstream, kind.clone()),
            )
            .await;
        }
    }

    async fn cut_one_way(&self, from: u64, to: u64, link: Link) {
        // Toxic names are unique per proxy: a second cut of the same direction is a no-op.
        let tag = format!("cut-{from}-{to}");
        let already = self
            .added
            .lock()
            .expect("toxics list")
            .iter()
            .any(|(p, t)| *p == self.name(from, to, link.kinds()[0]) && *t == format!("{tag}-up"));
        if !already {
            self.one_way(from, to, link, &tag, ToxicKind::Timeout { timeout: 0 })
                .await;
        }
    }

    /// Delays what `from` sends to `to` (every link) by `ms`.
    pub async fn latency_one_way(&self, from: u64, to: u64, ms: u64) {
        self.one_way(
            from,
            to,
            Link::All,
            &format!("latency-{from}-{to}"),
            ToxicKind::Latency {
                latency: ms,
                jitter: 0,
            },
        )
        .await;
    }

    /// Limits what `from` sends to `to`'s Postgres connections to `kb_per_s`.
    pub async fn bandwidth_one_way(&self, from: u64, to: u64, kb_per_s: u64) {
        self.one_way(
            from,
            to,
            Link::Postgres,
            &format!("bandwidth-{from}-{to}"),
            ToxicKind::Bandwidth { rate: kb_per_s },
        )
        .await;
    }

    /// Disables every proxy into and out of member `id`, the clients' included: its peers
    /// see connections refused and closed, as when a host's services die.
    pub async fn disable_member(&self, id: u64) {
        for ((from, to, _), name) in &self.proxies {
            if *from == id || *to == id {
                self.client
                    .set_enabled(name, false)
                    .await
                    .unwrap_or_else(|e| panic!("disable {name}: {e}"));
            }
        }
    }

    async fn heal(&self) {
        let added = std::mem::take(&mut *self.added.lock().expect("toxics list"));
        for (proxy, toxic) in added {
            self.client
                .remove_toxic(&proxy, &toxic)
                .await
                .unwrap_or_else(|e| panic!("remove toxic {toxic} from {proxy}: {e}"));
        }
        for name in self.proxies.values() {
            self.client
                .set_enabled(name, true)
                .await
                .unwrap_or_else(|e| panic!("enable {name}: {e}"));
        }
    }

    async fn describe(&self) -> String {
        let mut out = String::new();
        for name in self.proxies.values() {
            if let Ok(p) = self.client.proxy(name).await {
                if !p.enabled || !p.toxics.is_empty() {
                    let toxics: Vec<String> = p.toxics.iter().map(|t| t.name.clone()).collect();
                    out.push_str(&format!("{name} enabled={} toxics={toxics:?}\n", p.enabled));
                }
            }
        }
        out
    }
}

impl Drop for ToxiNet {
    /// Deletes this net's proxies on a server that outlives it (a user's Toxiproxy); our own
    /// server goes with `server`.
    fn drop(&mut self) {
        let client = self.client.clone();
        let names: Vec<String> = self.proxies.values().cloned().collect();
        let cleanup = async move {
            for name in names {
                let _ = client.delete_proxy(&name).await;
            }
        };
        // Drop may run on a runtime worker or after the runtime is gone: a runtime of its own,
        // on a thread of its own, serves both.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup);
            }
        })
        .join();
    }
}
