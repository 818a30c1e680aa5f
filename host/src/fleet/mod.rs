//! Routing between the nodes of a fleet: which node a request goes to, and why.
//!
//! `kvgate route` (HTTP in [`crate::api::route`]) keeps a [`Node`] per kvgate node — its
//! health and name from polling `/v1/kvgate/node`, the requests it has in flight and the
//! prefill work queued on it by this router — and a [`FleetIndex`] of the fleet's chunks
//! learnt from the shared tier's event stream. For each request [`choose`] picks the node
//! expected to answer first: the prompt tokens it would still have to compute (those no
//! local tier of it holds; a token it would fetch from the shared tier costs `fetch_cost` of
//! one computed) on top of the work ahead of it. SGLang's imbalance override comes first:
//! when the busiest node has more than `balance_abs_threshold` requests beyond the idlest
//! and more than `balance_rel_threshold` times its load, the idlest node gets the request.
//! A node that is down (its last poll failed or took longer than `node_timeout_ms`) is
//! never chosen.
//!
//! Must never: route on anything but what nodes reported and the stream announced, or send
//! one request to two nodes (a node that could not be connected to never received it).

pub mod index;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use index::{FleetIndex, Reuse};

use crate::config::RoutePolicy;

/// Most nodes one router spreads requests over.
pub const MAX_NODES: usize = 64;

/// A decoding stream's weight against queued prefill, in tokens: each turn of a node's
/// scheduler runs a decode step of every running stream beside one slice of prefill.
const DECODE_WEIGHT: usize = 16;

/// What a node says of itself (`GET /v1/kvgate/node`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct NodeReport {
    /// Its name on the event stream.
    pub node: String,
    /// The model it serves.
    pub model: String,
    /// The shared tier's event stream it writes, if it has a shared tier.
    pub events: Option<String>,
    /// Its default cache mode.
    pub cache_mode: String,
    pub min_span: usize,
    /// Requests waiting for admission, and running.
    pub waiting: u64,
    pub running: u64,
}

/// One node as a router sees it.
#[derive(Debug)]
pub struct Node {
    /// Base URL (`http://host:port`).
    pub url: String,
    up: AtomicBool,
    report: Mutex<Option<NodeReport>>,
    /// Requests of this router on it, until their answer ends.
    pub in_flight: AtomicUsize,
    /// Of those, requests whose answer has not begun, and the tokens they were expected to
    /// compute.
    pub starting: AtomicUsize,
    pub starting_tokens: AtomicUsize,
    pub requests: AtomicU64,
    /// Requests that could not be delivered or whose answer broke off.
    pub failures: AtomicU64,
}

impl Node {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            up: AtomicBool::new(false),
            report: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            starting_tokens: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Its name on the event stream (its URL until it has reported).
    pub fn name(&self) -> String {
        self.report.lock().unwrap().as_ref().map_or_else(|| self.url.clone(), |r| r.node.clone())
    }

    pub fn report(&self) -> Option<NodeReport> {
        self.report.lock().unwrap().clone()
    }

    /// Records a poll: its report, or that it failed or was too slow.
    pub fn polled(&self, report: Option<NodeReport>) {
        let up = report.is_some();
        if self.up.swap(up, Ordering::Relaxed) != up {
            tracing::info!(node = %self.url, up, "router: node health changed");
        }
        if let Some(r) = report {
            *self.report.lock().unwrap() = Some(r);
        }
    }

    /// Marks it down until its next good poll (a connection to it failed).
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(node = %self.url, "router: node unreachable; skipped until it answers a poll");
        }
    }

    /// What [`choose`] weighs for a prompt of which `local` tokens are in this node's tiers.
    pub fn candidate(&self, local: usize) -> Candidate {
        let report = self.report.lock().unwrap();
        Candidate {
            up: self.is_up(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            starting: self.starting.load(Ordering::Relaxed),
            starting_tokens: self.starting_tokens.load(Ordering::Relaxed),
            reported: report.as_ref().map_or(0, |r| (r.waiting + r.running) as usize),
            shared: report.as_ref().is_some_and(|r| r.events.is_some()),
            local,
        }
    }
}

/// One node's side of a choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidate {
    pub up: bool,
    pub in_flight: usize,
    pub starting: usize,
    pub starting_tokens: usize,
    /// Requests the node reported waiting and running (other routers' too).
    pub reported: usize,
    /// Whether it reads the shared tier (and so can reuse what it does not hold).
    pub shared: bool,
    /// Prompt tokens its local tiers hold.
    pub local: usize,
}

impl Candidate {
    /// Requests on it: this router's, or what it reported when that is more.
    fn load(&self) -> usize {
        self.in_flight.max(self.reported)
    }
}

/// Why a node was chosen (`kvgate:router_decisions_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The node expected to answer first, by reusable tokens and queued work.
    Cache,
    /// The imbalance override: the least loaded node.
    Balance,
    /// Round robin.
    RoundRobin,
    /// The other node after the chosen one could not be connected to.
    Retry,
}

impl Reason {
    pub const ALL: [Reason; 4] = [Reason::Cache, Reason::Balance, Reason::RoundRobin, Reason::Retry];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Cache => "cache",
            Reason::Balance => "balance",
            Reason::RoundRobin => "round_robin",
            Reason::Retry => "retry",
        }
    }
}

/// How [`choose`] decides.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub policy: RoutePolicy,
    pub balance_abs: usize,
    pub balance_rel: f64,
    pub fetch_cost: f64,
}

/// A prompt as a choice sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask {
    pub prompt_tokens: usize,
    /// Tokens covered by chunks anywhere in the fleet.
    pub stored: usize,
    /// Mean tokens computed per request so far (weighs requests other routers sent).
    pub mean_compute: usize,
    /// For round robin: the turn.
    pub turn: usize,
}

/// The prompt tokens `c` would compute for `ask`, and those it would fetch from the shared
/// tier (what no local tier of it holds; all it does not hold, without a shared tier).
pub fn work(c: &Candidate, ask: &Ask) -> (usize, usize) {
    let fetched = if c.shared { ask.stored.saturating_sub(c.local) } else { 0 };
    (ask.prompt_tokens.saturating_sub(c.local + fetched), fetched)
}

/// The expected work before `c` answers `ask`, in tokens computed.
pub fn cost(c: &Candidate, ask: &Ask, fetch_cost: f64) -> f64 {
    let (compute, fetched) = work(c, ask);
    let others = c.reported.saturating_sub(c.in_flight);
    let decoding = c.in_flight.saturating_sub(c.starting) + others;
    (c.starting_tokens + others * ask.mean_compute + decoding * DECODE_WEIGHT + compute) as f64
        + fetch_cost * fetched as f64
}

/// The up node with the fewest requests on it (the first of equals), for requests any node
/// answers alike.
pub fn least_loaded(nodes: &[Candidate]) -> Option<usize> {
    (0..nodes.len()).filter(|&i| nodes[i].up).min_by_key(|&i| nodes[i].load())
}

/// The node for `ask` among `nodes` (indices into it), with the reason; `None` when every
/// node is down. Ties go to the node listed first.
pub fn choose(nodes: &[Candidate], ask: &Ask, rules: &Rules) -> Option<(usize, Reason)> {
    let up: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].up).collect();
    if up.is_empty() {
        return None;
    }
    if rules.policy == RoutePolicy::RoundRobin {
        return Some((up[ask.turn % up.len()], Reason::RoundRobin));
    }
    let load = |i: &usize| nodes[*i].load();
    let (min, max) = (up.iter().map(load).min().unwrap_or(0), up.iter().map(load).max().unwrap_or(0));
    if max - min > rules.balance_abs && max as f64 > rules.balance_rel * min as f64 {
        let by_cost = |i: &usize| (load(i), cost(&nodes[*i], ask, rules.fetch_cost));
        let idlest = up.iter().copied().min_by(|a, b| by_cost(a).partial_cmp(&by_cost(b)).expect("finite"));
        return idlest.map(|i| (i, Reason::Balance));
    }
    let best = up.iter().copied().min_by(|a, b| {
        let (ca, cb) = (cost(&nodes[*a], ask, rules.fetch_cost), cost(&nodes[*b], ask, rules.fetch_cost));
        ca.partial_cmp(&cb).expect("finite").then(a.cmp(b))
    });
    best.map(|i| (i, Reason::Cache))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules { policy: RoutePolicy::CacheAware, balance_abs: 2, balance_rel: 1.5, fetch_cost: 0.05 };

    fn idle(local: usize) -> Candidate {
        Candidate { up: true, shared: true, local, ..Candidate::default() }
    }

    fn ask() -> Ask {
        Ask { prompt_tokens: 1000, stored: 800, mean_compute: 200, turn: 0 }
    }

    #[test]
    fn the_node_holding_the_prompt_wins_when_loads_are_even() {
        let nodes = [idle(0), idle(800), idle(300)];
        assert_eq!(choose(&nodes, &ask(), &RULES), Some((1, Reason::Cache)));
        // Without a shared tier, what a node does not hold it computes: the gap is larger.
        let own = [Candidate { shared: false, ..idle(0) }, Candidate { shared: false, ..idle(800) }];
        assert!(cost(&own[0], &ask(), 0.05) - cost(&own[1], &ask(), 0.05) > 700.0);
    }

    #[test]
    fn queued_work_outweighs_a_small_saving() {
        // The holder is already prefilling another prompt: fetching beats waiting for it.
        let busy = Candidate { in_flight: 1, starting: 1, starting_tokens: 400, ..idle(800) };
        assert_eq!(choose(&[busy, idle(0)], &ask(), &RULES), Some((1, Reason::Cache)));
    }

    #[test]
    fn an_overloaded_holder_is_passed_over() {
        let overloaded = Candidate { in_flight: 4, ..idle(800) };
        let nodes = [overloaded, idle(0), Candidate { in_flight: 1, ..idle(0) }];
        assert_eq!(choose(&nodes, &ask(), &RULES), Some((1, Reason::Balance)));
        // Load a node reported (another router's requests) counts too.
        let reported = Candidate { reported: 5, ..idle(800) };
        assert_eq!(choose(&[reported, idle(0)], &ask(), &RULES), Some((1, Reason::Balance)));
    }

    #[test]
    fn nodes_that_are_down_are_never_chosen() {
        let down = Candidate { up: false, ..idle(800) };
        assert_eq!(choose(&[down, idle(0)], &ask(), &RULES), Some((1, Reason::Cache)));
        assert_eq!(choose(&[down], &ask(), &RULES), None);
        let rr = Rules { policy: RoutePolicy::RoundRobin, ..RULES };
        let picks: Vec<usize> =
            (0..4).map(|turn| choose(&[idle(0), down, idle(0)], &Ask { turn, ..ask() }, &rr).unwrap().0).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }
}
