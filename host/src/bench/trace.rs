//! What clients send: request traces shaped like RAG frameworks, agents and memory systems,
//! drawn from a corpus of text.
//!
//! A gateway never chooses its prompts, so the benchmarks replay the shapes real clients
//! produce, each as a stream of `/v1/chat/completions` bodies:
//!
//! - `messages`: a system prompt, one message per retrieved passage, the question.
//! - `joined:<label>`: one user message, LangChain's "stuff" template — the passages joined in
//!   retrieval order under numbered labels (`passage`: "Passage 1:", `bracket`: "[1]",
//!   `none`: blank lines only), then the question.
//! - `agent`: ReAct sessions with a search tool; each turn re-sends the task and the most
//!   relevant earlier steps (thought, action, observation) in a new order, then the newest.
//! - `memory`: long-term memory: stored summaries re-selected and re-ordered into the system
//!   prompt every turn, then the user's new message.
//!
//! Passages are drawn by Zipf popularity, so some come back often and some once.
//!
//! Facts are planted in some passages ("The access code for the amber door is 4817."); a
//! prompt that carries one asks for it, so answers can be scored against the fact: the same
//! passage is cached in one order and neighbourhood and asked about in another.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// How passages are labelled when joined into one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// "Passage 1:\n…"
    Passage,
    /// "[1] …"
    Bracket,
    /// Blank lines between passages, nothing else.
    None,
}

/// The shape of a trace's prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Messages,
    Joined(Label),
    Agent,
    Memory,
}

impl Shape {
    pub const ALL: [Shape; 6] = [
        Shape::Joined(Label::Passage),
        Shape::Joined(Label::Bracket),
        Shape::Joined(Label::None),
        Shape::Messages,
        Shape::Agent,
        Shape::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Messages => "messages",
            Shape::Joined(Label::Passage) => "joined:passage",
            Shape::Joined(Label::Bracket) => "joined:bracket",
            Shape::Joined(Label::None) => "joined:none",
            Shape::Agent => "agent",
            Shape::Memory => "memory",
        }
    }
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "joined" => Ok(Shape::Joined(Label::Passage)),
            _ => Shape::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
                let names: Vec<&str> = Shape::ALL.iter().map(|t| t.name()).collect();
                format!("unknown trace shape `{s}` (one of: {})", names.join(", "))
            }),
        }
    }
}

/// A fact planted in a passage, and how it is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub question: String,
    /// What a right answer contains.
    pub answer: String,
    /// The start of an answer, after which the code follows (for scoring candidates).
    pub lead: String,
    /// Other codes, scored against the right one (a four-way choice, as evaluation harnesses
    /// score multiple-choice questions by log-likelihood).
    pub distractors: Vec<String>,
}

/// One request of a trace: the body to send, and the fact it asks for, if any.
#[derive(Debug, Clone)]
pub struct Request {
    pub body: Value,
    pub fact: Option<Fact>,
}

const COLORS: [&str; 12] = [
    "amber", "azure", "crimson", "emerald", "golden", "indigo", "ivory", "olive", "scarlet", "silver", "teal", "violet",
];

/// The fact planted in passage `p`, if it carries one (one passage in four).
fn fact(p: usize) -> Option<(String, Fact)> {
    if p % 4 != 1 {
        return None;
    }
    let color = COLORS[(p / 4) % COLORS.len()];
    let code = |p: usize| 1000 + (p * 7919) % 9000;
    let sentence = format!("The access code for the {color} door is {}.", code(p));
    let question = format!("What is the access code for the {color} door? Answer with the number.");
    let lead = format!("The access code for the {color} door is");
    let distractors = (1..=3).map(|k| code(p + 4 * k).to_string()).collect();
    Some((sentence, Fact { question, answer: code(p).to_string(), lead, distractors }))
}

/// Passage `p` as every prompt carries it: with its fact after its first sentence, if any.
fn passage(passages: &[String], p: usize) -> String {
    let text = &passages[p];
    match fact(p) {
        Some((sentence, _)) => match text.find(". ") {
            Some(i) => format!("{} {sentence} {}", &text[..i + 1], &text[i + 2..]),
            None => format!("{sentence} {text}"),
        },
        None => text.clone(),
    }
}

/// Every passage the trace `o` draws from, as its prompts carry them (planted facts in
/// place): what an operator ingests ahead of the trace.
pub fn corpus(passages: &[String], o: &TraceOptions) -> Vec<String> {
    let zipf = Zipf::new(passages.len(), o.pool, o.zipf_s, o.seed);
    zipf.ranked[..zipf.cdf.len()].iter().map(|&p| passage(passages, p)).collect()
}

/// How a trace is drawn.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub shape: Shape,
    /// Passages per RAG request, summaries per memory prompt.
    pub k: usize,
    /// Passages drawn from (the most frequent ones per Zipf).
    pub pool: usize,
    pub zipf_s: f64,
    pub seed: u64,
}

/// Text of the corpus, cut into passages of about `words` words.
pub fn passages(dir: &Path, words: usize) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = file_text(&f).unwrap_or_default();
        let mut current: Vec<&str> = Vec::new();
        for para in text.split("\n\n") {
            let w: Vec<&str> = para.split_whitespace().collect();
            if w.len() < 8 {
                continue; // headings, navigation, code fragments
            }
            current.extend(w);
            if current.len() >= words {
                out.push(current[..words].join(" "));
                current.clear();
            }
        }
    }
    anyhow::ensure!(out.len() >= 8, "the corpus {} gave only {} passages of {words} words", dir.display(), out.len());
    Ok(out)
}

/// The text of a corpus file (an HTML page's readable text).
fn file_text(f: &Path) -> std::io::Result<String> {
    let raw = std::fs::read_to_string(f)?;
    Ok(if f.extension().is_some_and(|e| e == "html" || e == "htm") { html_text(&raw) } else { raw })
}

/// The files at `paths` (directories walked for .txt/.md/.html) as documents for ingest:
/// (file and part, text), each of whole paragraphs up to about `words` words.
pub fn documents(paths: &[PathBuf], words: usize) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for p in paths {
        match p.is_dir() {
            true => collect_files(p, &mut files)?,
            false => files.push(p.clone()),
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = file_text(&f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
        let mut current = String::new();
        let mut part = 0;
        let mut flush = |current: &mut String| {
            if !current.trim().is_empty() {
                out.push((format!("{}#{part}", f.display()), std::mem::take(current)));
                part += 1;
            }
            current.clear();
        };
        for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
            if !current.is_empty() && current.split_whitespace().count() + para.split_whitespace().count() > words {
                flush(&mut current);
            }
            if !current.is_empty() {
                current.push_str("\n\n");
            }
            current.push_str(para);
        }
        flush(&mut current);
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no text found in {}",
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(out)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read corpus {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if p.extension().is_some_and(|x| ["txt", "md", "html", "htm"].iter().any(|y| x == *y)) {
            out.push(p);
        }
    }
    Ok(())
}

/// The readable text of an HTML page: its `<main>` if it has one, tags dropped, paragraphs
/// kept apart.
fn html_text(html: &str) -> String {
    let body = match (html.find("<main"), html.rfind("</main>")) {
        (Some(a), Some(b)) if a < b => &html[a..b],
        _ => html,
    };
    let mut out = String::with_capacity(body.len());
    let mut in_tag = false;
    let mut tag = String::new();
    let mut skip = false;
    for c in body.chars() {
        match (in_tag, c) {
            (false, '<') => {
                in_tag = true;
                tag.clear();
            }
            (true, '>') => {
                in_tag = false;
                let name = tag.trim_start_matches('/').split_whitespace().next().unwrap_or("").to_ascii_lowercase();
                if name == "pre" || name == "script" || name == "style" {
                    skip = !tag.starts_with('/');
                }
                if matches!(name.as_str(), "p" | "h1" | "h2" | "h3" | "li" | "pre" | "div") && tag.starts_with('/') {
                    out.push_str("\n\n");
                }
            }
            (true, c) => tag.push(c),
            (false, c) if !skip => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'")
}

/// Draws passage indices by Zipf popularity (rank r with weight 1 / r^s).
struct Zipf {
    cdf: Vec<f64>,
    /// Popularity rank → passage, over a shuffled pool so that rank does not follow file order.
    ranked: Vec<usize>,
}

impl Zipf {
    fn new(passages: usize, pool: usize, s: f64, seed: u64) -> Self {
        let pool = pool.min(passages).max(1);
        let mut acc = 0.0;
        let cdf: Vec<f64> = (1..=pool)
            .map(|r| {
                acc += 1.0 / (r as f64).powf(s);
                acc
            })
            .collect();
        let total = acc;
        let mut ranked: Vec<usize> = (0..passages).collect();
        ranked.shuffle(&mut StdRng::seed_from_u64(seed));
        Self { cdf: cdf.into_iter().map(|c| c / total).collect(), ranked }
    }

    fn draw(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.ranked[self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)]
    }

    /// `k` distinct passages (fewer if the pool is smaller), in the order drawn.
    fn distinct(&self, k: usize, rng: &mut StdRng) -> Vec<usize> {
        let k = k.min(self.cdf.len());
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        while chosen.len() < k {
            let p = self.draw(rng);
            if !chosen.contains(&p) {
                chosen.push(p);
            }
        }
        chosen
    }
}

/// The first `n` words of a passage: what a question or a search names it by.
fn topic(passage: &str, n: usize) -> String {
    passage.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}

const RAG_SYSTEM: &str = "You are a helpful assistant. Answer the question using only the passages the user gives you.";

/// `n` requests of the trace, in the order a client sends them.
pub fn prompts(passages: &[String], o: &TraceOptions, n: usize) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(o.seed ^ 0x5eed);
    let zipf = Zipf::new(passages.len(), o.pool, o.zipf_s, o.seed);
    match o.shape {
        Shape::Messages | Shape::Joined(_) => (0..n).map(|_| rag(passages, o, &zipf, &mut rng)).collect(),
        Shape::Agent => agent(passages, &zipf, &mut rng, n),
        Shape::Memory => (0..n).map(|_| memory(passages, o, &zipf, &mut rng)).collect(),
    }
}

fn rag(passages: &[String], o: &TraceOptions, zipf: &Zipf, rng: &mut StdRng) -> Request {
    let mut chosen = zipf.distinct(o.k, rng);
    chosen.shuffle(rng);
    // A passage with a fact in it is asked about; otherwise a passage is, by its first words.
    let fact = chosen.iter().find_map(|&p| fact(p)).map(|(_, f)| f);
    let question = match &fact {
        Some(f) => f.question.clone(),
        None => {
            let about = &passages[chosen[rng.random_range(0..chosen.len())]];
            format!("What does the passage that begins \"{}\" explain?", topic(about, 6))
        }
    };
    let mut messages = vec![json!({"role": "system", "content": RAG_SYSTEM})];
    match o.shape {
        Shape::Joined(label) => {
            let context: Vec<String> = chosen
                .iter()
                .enumerate()
                .map(|(i, &p)| match label {
                    Label::Passage => format!("Passage {}:\n{}", i + 1, passage(passages, p)),
                    Label::Bracket => format!("[{}] {}", i + 1, passage(passages, p)),
                    Label::None => passage(passages, p),
                })
                .collect();
            messages.push(json!({"role": "user", "content": format!(
                "Use the following pieces of context to answer the question at the end.\n\n{}\n\nQuestion: {question}",
                context.join("\n\n")
            )}));
        }
        _ => {
            messages.extend(
                chosen
                    .iter()
                    .map(|&p| json!({"role": "user", "content": format!("Passage:\n{}", passage(passages, p))})),
            );
            messages.push(json!({"role": "user", "content": format!("Question: {question}")}));
        }
    }
    Request { body: json!({ "messages": messages }), fact }
}

const AGENT_SYSTEM: &str = "You are a research agent answering questions about Rust. You can use one tool: \
search[query] returns a passage of the Rust book. Work in steps: write a Thought, then an Action, then read \
the Observation. Earlier steps are listed most relevant first. When you know the answer, write \
Final Answer: followed by the answer.";

/// ReAct sessions of 3 to 6 turns, one after another. Turn t re-sends the task, up to three
/// earlier steps re-ranked (a new order every turn), and the newest step. A session whose
/// task passage carries a fact asks for it, and its first search finds that passage, which
/// every later turn keeps.
fn agent(passages: &[String], zipf: &Zipf, rng: &mut StdRng, n: usize) -> Vec<Request> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let task_passage = zipf.draw(rng);
        let fact = fact(task_passage).map(|(_, f)| f);
        let task = match &fact {
            Some(f) => f.question.clone(),
            None => format!("Find out what the Rust book says about \"{}\".", topic(&passages[task_passage], 5)),
        };
        let turns = rng.random_range(3..=6);
        let mut steps: Vec<(String, usize)> = Vec::new();
        for turn in 0..turns {
            let observed = if turn == 0 && fact.is_some() { task_passage } else { zipf.draw(rng) };
            let thought = format!(
                "Thought: I should look up {}.\nAction: search[{}]",
                topic(&passages[observed], 4).to_lowercase(),
                topic(&passages[observed], 3)
            );
            steps.push((thought, observed));
            let (newest, earlier) = steps.split_last().expect("a step was just pushed");
            let mut kept: Vec<&(String, usize)> = earlier.iter().collect();
            kept.shuffle(rng);
            // The step that found the fact always stays among the kept ones.
            if let Some(i) = kept.iter().position(|s| fact.is_some() && s.1 == task_passage) {
                kept.swap(0, i);
            }
            kept.truncate(3);
            kept.shuffle(rng);
            let mut messages =
                vec![json!({"role": "system", "content": AGENT_SYSTEM}), json!({"role": "user", "content": task})];
            for (thought, p) in kept.into_iter().chain(std::iter::once(newest)) {
                messages.push(json!({"role": "assistant", "content": thought}));
                messages.push(json!({"role": "tool", "content": format!("Observation: {}", passage(passages, *p))}));
            }
            out.push(Request { body: json!({ "messages": messages }), fact: fact.clone() });
            if out.len() == n {
                break;
            }
        }
    }
    out
}

/// A memory turn: `k` summaries (the first 60 words of passages) re-selected and re-ordered
/// into the system prompt, then the user's message — a fact's question when one of the
/// summaries carries a fact.
fn memory(passages: &[String], o: &TraceOptions, zipf: &Zipf, rng: &mut StdRng) -> Request {
    let mut chosen = zipf.distinct(o.k.max(2) + 1, rng);
    chosen.shuffle(rng);
    let summaries: Vec<(usize, String)> = chosen.iter().map(|&p| (p, topic(&passage(passages, p), 60))).collect();
    let memories: Vec<String> = summaries.iter().map(|(p, s)| format!("- (2026-10-{:02}) {s}", 1 + p % 28)).collect();
    let system = format!(
        "You are a helpful assistant with a long-term memory of this user.\n\nWhat you remember (most relevant first):\n{}",
        memories.join("\n")
    );
    let fact = summaries
        .iter()
        .find_map(|(p, s)| fact(*p).filter(|(sentence, _)| s.contains(sentence.as_str())).map(|(_, f)| f));
    let user = match &fact {
        Some(f) => f.question.clone(),
        None => format!("Remind me what we said about {}, briefly.", topic(&passages[chosen[0]], 4)),
    };
    Request {
        body: json!({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]}),
        fact,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..50).map(|i| (0..80).map(|w| format!("w{i}x{w}")).collect::<Vec<_>>().join(" ")).collect()
    }

    fn opts(shape: Shape) -> TraceOptions {
        TraceOptions { shape, k: 4, pool: 20, zipf_s: 1.0, seed: 3 }
    }

    #[test]
    fn html_text_keeps_prose_and_drops_code() {
        let t = html_text(
            "<nav>menu</nav><main><h1>Title</h1><p>Some &amp; text.</p><pre>let x = 1;</pre><p>More.</p></main>",
        );
        assert!(t.contains("Some & text.") && t.contains("More."));
        assert!(!t.contains("let x") && !t.contains("menu"));
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let z = Zipf::new(100, 100, 1.0, 1);
        let mut rng = StdRng::seed_from_u64(1);
        let top: Vec<usize> = z.ranked[..10].to_vec();
        let low = (0..2000).filter(|_| top.contains(&z.draw(&mut rng))).count();
        assert!(low > 2000 / 3, "{low}");
    }

    #[test]
    fn joined_prompts_label_passages_in_order_in_one_message() {
        let p = corpus();
        for (label, first) in [(Label::Passage, "Passage 1:\n"), (Label::Bracket, "[1] "), (Label::None, "")] {
            let body = &prompts(&p, &opts(Shape::Joined(label)), 1)[0].body;
            let msgs = body["messages"].as_array().unwrap();
            assert_eq!(msgs.len(), 2);
            let user = msgs[1]["content"].as_str().unwrap();
            assert!(user.contains(&format!("\n\n{first}w")), "{label:?}: {user}");
            assert!(user.contains("\n\nQuestion: "));
        }
    }

    #[test]
    fn agent_turns_resend_earlier_observations_in_new_orders() {
        let p = corpus();
        let trace: Vec<Value> = prompts(&p, &opts(Shape::Agent), 12).into_iter().map(|r| r.body).collect();
        assert_eq!(trace.len(), 12);
        let observations = |b: &Value| -> Vec<String> {
            b["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "tool")
                .map(|m| m["content"].to_string())
                .collect()
        };
        // Some later turn repeats an observation of an earlier turn of its session.
        let repeats =
            trace.windows(2).filter(|w| observations(&w[1]).iter().any(|o| observations(&w[0]).contains(o))).count();
        assert!(repeats >= 3, "{repeats}");
        assert!(trace.iter().all(|b| observations(b).len() <= 4));
    }

    #[test]
    fn memory_prompts_reselect_summaries_into_the_system_prompt() {
        let p = corpus();
        let trace: Vec<Value> = prompts(&p, &opts(Shape::Memory), 5).into_iter().map(|r| r.body).collect();
        let system = trace[0]["messages"][0]["content"].as_str().unwrap();
        assert_eq!(system.matches("\n- (2026-10-").count(), 5);
        assert!(trace.windows(2).all(|w| w[0] != w[1]));
    }

    /// A prompt that carries a planted fact asks for it, and the answer is in the prompt.
    #[test]
    fn planted_facts_are_asked_where_they_are_carried() {
        let p = corpus();
        for shape in Shape::ALL {
            let trace = prompts(&p, &opts(shape), 40);
            let asked: Vec<&Request> = trace.iter().filter(|r| r.fact.is_some()).collect();
            assert!(asked.len() >= 4, "{}: {} fact questions", shape.name(), asked.len());
            for r in asked {
                let f = r.fact.as_ref().unwrap();
                let text = r.body.to_string();
                assert!(text.contains(&format!("is {}.", f.answer)) && text.contains(&f.question), "{}", shape.name());
            }
        }
    }

    #[test]
    fn shapes_parse_by_name() {
        for s in Shape::ALL {
            assert_eq!(s.name().parse::<Shape>(), Ok(s));
        }
        assert!("joined:fancy".parse::<Shape>().unwrap_err().contains("joined:bracket"));
    }
}
