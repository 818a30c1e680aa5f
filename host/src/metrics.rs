//! Counters and histograms, rendered in Prometheus' text format at `GET /metrics`.
//!
//! Names follow vLLM's (`kvgate:` prefix, `_total` counters, `_seconds` histograms) so that
//! dashboards built for it carry over. Lock-free on the request path: atomics only.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus `+Inf`.
    counts: Vec<AtomicU64>,
    /// Sum of observations, in nanoseconds (integer so that it can be atomic).
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_nanos: AtomicU64::new(0) }
    }

    /// Records one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let i = self.bounds.iter().position(|&b| seconds <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        acc += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {acc}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {acc}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The gateway's metrics.
pub struct Metrics {
    /// Finished generations, by finish reason.
    pub success_stop: AtomicU64,
    pub success_length: AtomicU64,
    /// Requests answered with an error, by status class.
    pub errors_4xx: AtomicU64,
    pub errors_5xx: AtomicU64,
    /// Requests refused because the queue was full (also counted in `errors_4xx`).
    pub rejected_queue_full: AtomicU64,
    /// Requests refused for a missing or unknown API key (401).
    pub rejected_auth: AtomicU64,
    /// Requests refused for a key's concurrency or rate limit (429).
    pub rejected_limits: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Prompt tokens served from cache.
    pub cached_prompt_tokens: AtomicU64,
    /// Generations queued or running.
    pub in_flight: AtomicU64,
    pub ttft: Histogram,
    pub e2e_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            success_stop: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            errors_4xx: AtomicU64::new(0),
            errors_5xx: AtomicU64::new(0),
            rejected_queue_full: AtomicU64::new(0),
            rejected_auth: AtomicU64::new(0),
            rejected_limits: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BOUNDS),
            e2e_latency: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

impl Metrics {
    /// Prometheus text exposition, with the engine's own counters when it is running.
    pub fn render(
        &self,
        engine: Option<&crate::scheduler::SchedulerStats>,
        store: Option<&crate::store::StoreStats>,
    ) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "kvgate:request_success_total",
            "Generations finished, by finish reason.",
            &[
                ("{finished_reason=\"stop\"}", get(&self.success_stop)),
                ("{finished_reason=\"length\"}", get(&self.success_length)),
            ],
        );
        counter(
            "kvgate:request_errors_total",
            "Requests answered with an error, by status class.",
            &[("{status=\"4xx\"}", get(&self.errors_4xx)), ("{status=\"5xx\"}", get(&self.errors_5xx))],
        );
        counter(
            "kvgate:request_rejected_queue_full_total",
            "Requests refused with 429 because the queue was full.",
            &[("", get(&self.rejected_queue_full))],
        );
        counter(
            "kvgate:request_rejected_auth_total",
            "Requests refused with 401: no API key, or an unknown one.",
            &[("", get(&self.rejected_auth))],
        );
        counter(
            "kvgate:request_rejected_limits_total",
            "Requests refused with 429 by a key's concurrency or rate limit.",
            &[("", get(&self.rejected_limits))],
        );
        counter("kvgate:prompt_tokens_total", "Prompt tokens processed.", &[("", get(&self.prompt_tokens))]);
        counter("kvgate:generation_tokens_total", "Tokens generated.", &[("", get(&self.generation_tokens))]);
        counter(
            "kvgate:prompt_tokens_cached_total",
            "Prompt tokens served from cache.",
            &[("", get(&self.cached_prompt_tokens))],
        );
        if let Some(e) = engine {
            counter(
                "kvgate:engine_generated_tokens_total",
                "Tokens the engine generated, including for clients that left.",
                &[("", get(&e.generated_tokens))],
            );
            counter(
                "kvgate:requests_cancelled_total",
                "Requests dropped because the client went away.",
                &[("", get(&e.cancelled))],
            );
            counter(
                "kvgate:prompt_tokens_recomputed_total",
                "Reused prompt tokens recomputed to stitch chunks together.",
                &[("", get(&e.prompt_tokens_recomputed))],
            );
            counter(
                "kvgate:cache_queries_total",
                "Prompt tokens looked up in the chunk cache (prefix and compose modes).",
                &[("", get(&e.cache_queried_tokens))],
            );
            counter(
                "kvgate:cache_hits_total",
                "Prompt tokens reused from the chunk cache.",
                &[("", get(&e.prompt_tokens_cached))],
            );
            counter(
                "kvgate:cache_spans_total",
                "Runs of tokens spliced from stored chunks: whole chunks, or runs inside one.",
                &[("{kind=\"whole\"}", get(&e.spans_whole)), ("{kind=\"partial\"}", get(&e.spans_partial))],
            );
            counter("kvgate:chunks_stored_total", "New chunks stored.", &[("", get(&e.chunks_stored))]);
            counter("kvgate:decode_steps_total", "Batched decode steps.", &[("", get(&e.decode_steps))]);
            counter(
                "kvgate:decode_rows_total",
                "Sequences advanced by decode steps (divided by the steps: the mean batch).",
                &[("", get(&e.decode_rows))],
            );
            counter(
                "kvgate:prompt_rows_scored_total",
                "Echoed prompt rows scored: through the LM head, or remembered from an earlier prompt \
                 that reused the same stored chunk.",
                &[
                    ("{from=\"model\"}", get(&e.scored_rows_computed)),
                    ("{from=\"memo\"}", get(&e.scored_rows_remembered)),
                ],
            );
            for (name, help, v) in [
                ("kvgate:num_requests_running", "Requests prefilling or decoding.", get(&e.running)),
                ("kvgate:num_requests_waiting", "Requests waiting for admission.", get(&e.waiting)),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
            e.lookup_seconds.render(&mut out, "kvgate:cache_lookup_seconds", "Time to find a prompt's stored runs.");
        }
        if let Some(s) = store {
            render_store(&mut out, s);
        }
        let _ = writeln!(
            out,
            "# HELP kvgate:num_requests_in_flight Generations queued or running.\n# TYPE kvgate:num_requests_in_flight gauge\nkvgate:num_requests_in_flight {}",
            get(&self.in_flight)
        );
        if let Some(rss) = resident_bytes() {
            let _ = writeln!(
                out,
                "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
            );
        }
        self.ttft.render(&mut out, "kvgate:time_to_first_token_seconds", "Time from request to first generated token.");
        self.e2e_latency.render(
            &mut out,
            "kvgate:e2e_request_latency_seconds",
            "Time from request to last generated token.",
        );
        out
    }
}

/// The chunk store's gauges and counters, per tier where it has tiers.
fn render_store(out: &mut String, s: &crate::store::StoreStats) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let tiers = |f: fn(&crate::store::TierStats) -> &AtomicU64| -> Vec<(&'static str, u64)> {
        vec![("{tier=\"ram\"}", get(f(&s.ram))), ("{tier=\"disk\"}", get(f(&s.disk)))]
    };
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    family("kvgate:chunk_store_entries", "gauge", "Chunks held, per tier.", &tiers(|t| &t.entries));
    family("kvgate:chunk_store_bytes", "gauge", "KV payload bytes held, per tier.", &tiers(|t| &t.bytes));
    family("kvgate:chunk_store_budget_bytes", "gauge", "Byte budget, per tier.", &tiers(|t| &t.budget));
    family("kvgate:chunk_store_hits_total", "counter", "Lookups answered, per tier.", &tiers(|t| &t.hits));
    family("kvgate:chunk_store_misses_total", "counter", "Lookups not answered, per tier.", &tiers(|t| &t.misses));
    family("kvgate:chunk_store_evictions_total", "counter", "Chunks evicted, per tier.", &tiers(|t| &t.evictions));
    family(
        "kvgate:chunk_store_evictor_fallbacks_total",
        "counter",
        "Eviction rounds whose evictor answer was corrected or replaced by LRU, per tier.",
        &tiers(|t| &t.evictor_fallbacks),
    );
    family(
        "kvgate:chunk_store_corruptions_total",
        "counter",
        "Payloads that failed their checks on read (served as misses, removed).",
        &[("", get(&s.corruptions))],
    );
    family(
        "kvgate:chunk_store_write_errors_total",
        "counter",
        "Disk writes that failed (full disk, read-only directory, I/O error).",
        &[("", get(&s.write_errors))],
    );
    family(
        "kvgate:chunk_store_writes_skipped_total",
        "counter",
        "Chunks not written to disk: writer queue full or disk degraded.",
        &[("", get(&s.writes_skipped))],
    );
    family(
        "kvgate:chunk_store_disk_degraded",
        "gauge",
        "1 while disk writes are failing and the store serves without storing.",
        &[("", get(&s.degraded))],
    );
    family("kvgate:chunk_store_disk_enabled", "gauge", "1 when the disk tier is open.", &[("", get(&s.disk_enabled))]);
    let r = &s.remote;
    for (name, kind, help, v) in [
        ("enabled", "gauge", "1 when a shared (Redis) tier is configured.", &r.enabled),
        ("up", "gauge", "1 while the shared tier answers.", &r.up),
        ("breaker_open", "gauge", "1 while the circuit breaker skips the shared tier.", &r.breaker_open),
        ("hits_total", "counter", "Chunks read from the shared tier.", &r.hits),
        ("misses_total", "counter", "Shared-tier reads that found nothing (evicted or gone).", &r.misses),
        ("errors_total", "counter", "Shared-tier commands that failed or timed out.", &r.errors),
        ("corruptions_total", "counter", "Shared-tier values that failed their checks (deleted).", &r.corruptions),
        ("writes_total", "counter", "Chunks written to the shared tier.", &r.writes),
        (
            "writes_skipped_total",
            "counter",
            "Chunks not shared: queue full, breaker open or write failed.",
            &r.writes_skipped,
        ),
        ("read_bytes_total", "counter", "Value bytes read from the shared tier.", &r.bytes_read),
        ("events_total", "counter", "Fleet events applied to the span index.", &r.events),
    ] {
        family(&format!("kvgate:chunk_store_remote_{name}"), kind, help, &[("", get(v))]);
    }
    s.disk_load_seconds.render(
        out,
        "kvgate:chunk_store_disk_load_seconds",
        "Time to read, verify and decode one chunk from disk.",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(0.003);
        m.ttft.observe(0.3);
        m.ttft.observe(500.0);
        let text = m.render(None, None);
        assert!(text.contains("kvgate:time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("kvgate:time_to_first_token_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("kvgate:time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("kvgate:time_to_first_token_seconds_count 3"));
    }
}

/// This process's resident memory, from `/proc/self/statm` (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}
