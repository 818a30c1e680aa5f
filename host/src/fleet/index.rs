//! What a router knows of the fleet's chunks: every chunk the shared tier's event stream
//! announced, by content (a [`SpanIndex`], so a prompt's runs are found as a node finds
//! them), and which nodes hold each in their local tiers.
//!
//! Learnt only from the stream (`put`, `have`, `drop`, `gone`), never guessed: a node's
//! `put` and `have` say it holds the chunk in RAM or on disk, its `drop` that it no longer
//! does, anyone's `gone` that no tier does. The index is a hint for choosing a node — a node
//! verifies every chunk it splices — so an event lost (a full queue, a trimmed stream) costs
//! a worse choice, never a wrong answer.

use crate::store::remote::{Event, NodeEvent};
use crate::store::span::Tier;
use crate::store::{ChunkKey, SpanIndex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use super::MAX_NODES;

/// The fleet's chunks and their holders.
pub struct FleetIndex {
    inner: RwLock<Inner>,
    /// Events applied.
    pub events: AtomicU64,
    /// Whether the stream answered its last read.
    pub up: AtomicBool,
    closing: AtomicBool,
}

struct Inner {
    spans: SpanIndex,
    /// Per chunk, a bit per node (by [`Inner::nodes`]) that holds it locally.
    holders: HashMap<ChunkKey, u64>,
    /// Node names in the order first seen: bit `i` is `nodes[i]`.
    nodes: Vec<String>,
}

impl Inner {
    /// The bit of `node`, given one if it has none (`None`: no name, or too many names).
    fn bit(&mut self, node: &str) -> Option<u64> {
        if node.is_empty() {
            return None;
        }
        let i = match self.nodes.iter().position(|n| n == node) {
            Some(i) => i,
            None if self.nodes.len() < MAX_NODES => {
                self.nodes.push(node.to_string());
                self.nodes.len() - 1
            }
            None => return None,
        };
        Some(1 << i)
    }
}

/// What a prompt could reuse across the fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reuse {
    /// Tokens covered by runs of any announced chunk.
    pub total: usize,
    /// Of those, the tokens each asked-for node holds locally (in the order asked).
    pub local: Vec<usize>,
}

impl FleetIndex {
    /// An empty index finding runs of at least `min_span` tokens (the nodes' setting).
    pub fn new(min_span: usize) -> Self {
        Self {
            inner: RwLock::new(Inner { spans: SpanIndex::new(min_span), holders: HashMap::new(), nodes: Vec::new() }),
            events: AtomicU64::new(0),
            up: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }
    }

    /// Applies events in stream order.
    pub fn apply(&self, events: &[NodeEvent]) {
        let mut inner = self.inner.write().unwrap();
        for e in events {
            let bit = inner.bit(&e.node).unwrap_or(0);
            match &e.event {
                Event::Put { key, namespace, tokens } => {
                    inner.spans.held(*key, tokens, None, Tier::Remote, *namespace);
                    *inner.holders.entry(*key).or_default() |= bit;
                }
                Event::Have { key, .. } if inner.spans.contains(key) => {
                    *inner.holders.entry(*key).or_default() |= bit;
                }
                Event::Have { .. } => {}
                Event::Drop { key, .. } => {
                    if let Some(h) = inner.holders.get_mut(key) {
                        *h &= !bit;
                    }
                }
                Event::Gone { key, .. } => {
                    inner.spans.remove(key);
                    inner.holders.remove(key);
                }
            }
        }
        self.events.fetch_add(events.len() as u64, Ordering::Relaxed);
    }

    /// Chunks known.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap().spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The runs of `prompt` (in the namespaces `read`) stored anywhere in the fleet, and how
    /// many of their tokens each of `nodes` holds locally.
    pub fn reuse(&self, prompt: &[u32], read: &[u64], nodes: &[&str]) -> Reuse {
        let inner = self.inner.read().unwrap();
        let bits: Vec<u64> =
            nodes.iter().map(|n| inner.nodes.iter().position(|m| m == n).map_or(0, |i| 1 << i)).collect();
        let mut out = Reuse { total: 0, local: vec![0; nodes.len()] };
        for m in inner.spans.find(prompt, read) {
            out.total += m.len();
            let held = inner.holders.get(&m.key).copied().unwrap_or(0);
            for (local, bit) in out.local.iter_mut().zip(&bits) {
                if held & bit != 0 {
                    *local += m.len();
                }
            }
        }
        out
    }

    /// Follows the stream `events_key` on the Redis at `url` from its oldest event (a router
    /// keeps nothing: a restarted one replays what the stream kept), until
    /// [`FleetIndex::close`]; reconnects every half second while Redis is away.
    pub fn follow(self: &Arc<Self>, url: &str, events_key: String) -> Result<JoinHandle<()>, String> {
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        let status = move |r: Result<(), redis::RedisError>| {
            if let (true, Err(e)) = (b.up.swap(r.is_ok(), Ordering::Relaxed), r) {
                tracing::warn!(error = %e, "router: the shared tier's event stream failed; routing on what it knew");
            }
        };
        let go_on = move || !c.closing.load(Ordering::Relaxed);
        let apply = move |e: &[NodeEvent], _: &str| a.apply(e);
        crate::store::remote::follow(url, "kvgate-fleet-index", events_key, "0".into(), apply, status, go_on)
    }

    /// Stops [`FleetIndex::follow`] (within half a second).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(node: &str, event: Event) -> NodeEvent {
        NodeEvent { node: node.into(), event }
    }

    #[test]
    fn holders_follow_put_have_drop_and_gone() {
        let idx = FleetIndex::new(16);
        let tokens: Vec<u32> = (100..164).collect();
        let key = ChunkKey([3; 32]);
        idx.apply(&[ev("a", Event::Put { key, namespace: 0, tokens: tokens.clone() })]);
        let mut prompt = vec![1, 2, 3];
        prompt.extend(&tokens[8..48]);
        prompt.extend([4, 5]);
        let r = idx.reuse(&prompt, &[0], &["a", "b"]);
        assert_eq!((r.total, r.local.clone()), (40, vec![40, 0]), "a stored it, b never saw it");
        assert_eq!(idx.reuse(&prompt, &[7], &["a"]).total, 0, "another namespace finds nothing");
        idx.apply(&[ev("b", Event::Have { key, namespace: 0 }), ev("a", Event::Drop { key, namespace: 0 })]);
        assert_eq!(idx.reuse(&prompt, &[0], &["a", "b"]).local, vec![0, 40]);
        idx.apply(&[ev("b", Event::Gone { key, namespace: 0 })]);
        assert_eq!(idx.reuse(&prompt, &[0], &["a", "b"]), Reuse { total: 0, local: vec![0, 0] });
        idx.apply(&[ev("c", Event::Have { key, namespace: 0 })]);
        assert!(idx.is_empty(), "a `have` of a chunk never put (or gone) adds nothing");
    }
}
