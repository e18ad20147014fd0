//! One model version, generating for many requests at once.
//!
//! Each [`Engine`] owns a thread with the model and a KV cache of `max_batch` slots. The
//! thread does continuous batching: before every decoding step it admits waiting requests (up
//! to `max_batch`, each taking a free slot, its prompt run once with [`Gpt::prefill`]), then
//! advances every other active sequence by one token in a single batched pass
//! ([`Gpt::decode`]: one position per sequence, attending to its cached keys and values),
//! picks each sequence's next token with that request's own sampling settings and random
//! stream, and lets finished sequences go. A request that arrives mid-generation joins at the
//! next step instead of waiting for the batch to finish. Past `block_size` tokens a sequence
//! continues on a sliding window, recomputed each step (positions are absolute).
//!
//! An engine that is swapped out finishes what it has: the thread runs until its queue is
//! closed (the last `Arc<Engine>` dropped) and its active sequences are done.

use crate::api::FinishReason;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::UnboundedSender;
use troupe_common::data::Tokenizer;
use troupe_common::model::{Gpt, KvCache, Rng, Sampling, TokenLogProb};

/// What a request asks the engine for (prompt already tokenized and checked).
pub struct Generation {
    pub prompt: Vec<i64>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Log-probabilities of each generated token with this many alternatives (OpenAI's
    /// `logprobs`), sent as `Token` events.
    pub logprobs: Option<usize>,
    /// Score the prompt too (OpenAI's `echo` with `logprobs`): a `Prompt` event first.
    pub score_prompt: bool,
    /// Text as it becomes final, then `Done` (or `Failed`). Closing the receiver (a client
    /// that went away) cancels the generation at the next step.
    pub events: UnboundedSender<GenEvent>,
}

#[derive(Debug)]
pub enum GenEvent {
    /// The prompt's tokens scored (from its second token on), before anything is generated.
    Prompt(Vec<TokenLogProb>),
    /// A generated token and its log-probability (only when asked), before its text.
    Token(TokenLogProb),
    Text(String),
    Done {
        finish_reason: FinishReason,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Batch sizes the thread ran, for the metrics (called once per decoding step).
pub type BatchObserver = Arc<dyn Fn(usize) + Send + Sync>;

pub struct Engine {
    pub version: u32,
    pub block_size: usize,
    /// How `/v1/chat/completions` renders messages: the version's `chat_template.json` (that
    /// of the chat data it was fine-tuned on), or the default template.
    pub chat_template: troupe_common::data::chat::ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    queue: mpsc::Sender<Generation>,
    /// Requests queued and not yet admitted, to refuse new ones beyond `max_queue`.
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    /// Cleared if the thread ever stops while the engine is still live (a bug): the
    /// deployment then loads the version again.
    alive: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are waiting; retry later")]
    Overloaded(usize),
    #[error("this model version is shutting down")]
    Closed,
}

impl Engine {
    /// Loads a model folder on a new thread and starts generating. Returns once the model is
    /// loaded (an error names what is wrong with the folder).
    pub fn start(dir: &Path, version: u32, max_batch: usize, max_queue: usize, on_batch: BatchObserver) -> anyhow::Result<Engine> {
        let (model, tokenizer) = troupe_common::model::load_for_inference(dir, tch::Device::Cpu)?;
        let block_size = model.config().block_size;
        let chat_template = troupe_common::data::chat::ChatTemplate::load_or_default(dir)?;
        let max_batch = max_batch.max(1);
        let cache = model.kv_cache(max_batch)?;
        let tokenizer = Arc::new(tokenizer);
        let (queue, requests) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let thread_tokenizer = tokenizer.clone();
        let thread_waiting = waiting.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let thread_alive = alive.clone();
        std::thread::Builder::new().name(format!("engine-v{version}")).spawn(move || {
            generate_loop(&model, cache, &thread_tokenizer, &requests, &thread_waiting, &on_batch);
            thread_alive.store(false, Ordering::SeqCst);
            tracing::debug!("engine v{version} stopped");
        })?;
        Ok(Engine { version, block_size, chat_template, tokenizer, queue, waiting, max_queue, alive })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn submit(&self, generation: Generation) -> Result<(), SubmitError> {
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded(waiting));
        }
        self.queue.send(generation).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Closed
        })
    }

    /// False once its thread has stopped (it only does when the engine is dropped).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Requests waiting for a place in the batch.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// A request being generated.
struct Active {
    request: Generation,
    /// Prompt followed by the tokens generated so far.
    tokens: Vec<i64>,
    generated: Vec<u32>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    rng: Rng,
    /// Its place in the KV cache, and whether its context has been run through it yet.
    slot: usize,
    prefilled: bool,
    /// Its prompt has been scored (or needed no scoring).
    scored: bool,
}

fn generate_loop(
    model: &Gpt,
    mut cache: KvCache,
    tokenizer: &Tokenizer,
    requests: &mpsc::Receiver<Generation>,
    waiting: &AtomicUsize,
    on_batch: &BatchObserver,
) {
    let eot = tokenizer.eot_id();
    let block_size = model.config().block_size;
    let mut free: Vec<usize> = (0..cache.slots()).rev().collect();
    let mut active: Vec<Active> = Vec::new();
    let mut closed = false;
    loop {
        // Admit: block only when there is nothing to do.
        if active.is_empty() {
            if closed {
                return;
            }
            match requests.recv() {
                Ok(r) => active.push(admit(r, waiting, &mut free)),
                Err(_) => return,
            }
        }
        while !closed && !free.is_empty() {
            match requests.try_recv() {
                Ok(r) => active.push(admit(r, waiting, &mut free)),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => closed = true,
            }
        }
        // Newly admitted requests that score their prompt do it now, with one forward pass;
        // those that generate nothing (max_tokens 0, scoring only) are then done.
        let vocab = tokenizer.vocab_size();
        for a in active.iter_mut().filter(|a| !a.prefilled && !a.scored) {
            a.scored = true;
            if a.request.score_prompt {
                let top = a.request.logprobs.unwrap_or(0);
                match model.score_tokens(&a.request.prompt, top, vocab) {
                    Ok(scores) => {
                        let _ = a.request.events.send(GenEvent::Prompt(scores));
                    }
                    Err(e) => {
                        let _ = a.request.events.send(GenEvent::Failed(format!("scoring the prompt failed: {e}")));
                        a.request.max_tokens = 0; // released below, without a Done
                        continue;
                    }
                }
            }
            if a.request.max_tokens == 0 {
                let _ = a.request.events.send(GenEvent::Done { finish_reason: FinishReason::Length, completion_tokens: 0 });
            }
        }
        release(&mut active, &mut free, |a| a.request.max_tokens == 0);
        // A client that went away stops costing compute.
        release(&mut active, &mut free, |a| a.request.events.is_closed());
        if active.is_empty() {
            continue;
        }
        on_batch(active.len());
        // libtorch reports some errors by panicking; one failed step fails its requests, not
        // the engine (their slots are refilled from scratch by the next requests).
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| next_logits(model, &mut cache, &mut active, block_size)));
        let step = step.unwrap_or_else(|panic| {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(troupe_common::model::ModelError::InvalidArgument(format!("the forward pass failed: {}", what.unwrap_or_default())))
        });
        let rows = match step {
            Ok(rows) => rows,
            Err(e) => {
                for a in active.drain(..) {
                    free.push(a.slot);
                    let _ = a.request.events.send(GenEvent::Failed(format!("generation failed: {e}")));
                }
                continue;
            }
        };
        let mut finished = vec![false; active.len()];
        // A model may have more ids than its tokenizer (a padded vocabulary): never pick those.
        for (i, (a, row)) in active.iter_mut().zip(rows).enumerate() {
            let next = a.request.sampling.pick(&row[..vocab.min(row.len())], &mut a.rng) as u32;
            if let Some(top) = a.request.logprobs.filter(|_| next != eot) {
                // From the model's distribution itself (temperature 1, nothing cut off), as a
                // scoring client expects, whatever the sampling settings.
                let scored = troupe_common::model::score(&troupe_common::model::log_probs(&row, vocab), next, top);
                let _ = a.request.events.send(GenEvent::Token(scored));
            }
            if next == eot {
                finish(a, tokenizer, FinishReason::Stop);
                finished[i] = true;
                continue;
            }
            a.tokens.push(next as i64);
            a.generated.push(next);
            if step_text(a, tokenizer) {
                finished[i] = true;
            } else if a.generated.len() >= a.request.max_tokens {
                finish(a, tokenizer, FinishReason::Length);
                finished[i] = true;
            }
        }
        let mut done = finished.into_iter();
        release(&mut active, &mut free, |_| done.next().unwrap_or(false));
    }
}

/// The next-token logits of every active sequence, in order: new sequences (and those past
/// the context, on a sliding window) are run whole through their slot; the rest advance by
/// their newest token, all in one batched pass.
fn next_logits(model: &Gpt, cache: &mut KvCache, active: &mut [Active], block_size: usize) -> troupe_common::model::Result<Vec<Vec<f32>>> {
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; active.len()];
    let (mut batch, mut slots, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    for (i, a) in active.iter_mut().enumerate() {
        let n = a.tokens.len();
        if !a.prefilled || n > block_size {
            rows[i] = Some(model.prefill(cache, a.slot, &a.tokens[n.saturating_sub(block_size)..])?);
            a.prefilled = true;
        } else {
            batch.push(i);
            slots.push(a.slot);
            tokens.push(a.tokens[n - 1]);
        }
    }
    for (i, row) in batch.into_iter().zip(model.decode(cache, &slots, &tokens)?) {
        rows[i] = Some(row);
    }
    Ok(rows.into_iter().map(|r| r.unwrap_or_default()).collect())
}

/// Removes the sequences `gone` says are over, returning their slots.
fn release(active: &mut Vec<Active>, free: &mut Vec<usize>, mut gone: impl FnMut(&Active) -> bool) {
    active.retain(|a| {
        let over = gone(a);
        if over {
            free.push(a.slot);
        }
        !over
    });
}

fn admit(request: Generation, waiting: &AtomicUsize, free: &mut Vec<usize>) -> Active {
    waiting.fetch_sub(1, Ordering::SeqCst);
    let rng = Rng::new(request.seed);
    let slot = free.pop().expect("admitted only while a slot is free");
    Active { tokens: request.prompt.clone(), generated: Vec::new(), sent: 0, rng, slot, prefilled: false, scored: false, request }
}

/// Sends the text that is final after the newest token. Text is held back while it ends in
/// an incomplete UTF-8 character (byte-level tokens split characters) or could still become
/// a stop sequence. Returns true when a stop sequence ended the generation.
fn step_text(a: &mut Active, tokenizer: &Tokenizer) -> bool {
    let text = decoded(a, tokenizer);
    // Search only text not sent yet (sent text held no stop sequence).
    let from = if a.sent <= text.len() && text.is_char_boundary(a.sent) { a.sent } else { 0 };
    if let Some(at) = a.request.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|p| p + from)).min() {
        send_text(a, &text[..at]);
        let _ = a.request.events.send(GenEvent::Done { finish_reason: FinishReason::Stop, completion_tokens: a.generated.len() });
        return true;
    }
    let mut safe = text.len();
    if text.ends_with('\u{FFFD}') {
        safe -= '\u{FFFD}'.len_utf8();
    }
    // Hold back the longest tail that is a proper prefix of a stop sequence.
    let held = a
        .request
        .stop
        .iter()
        .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
        .filter(|prefix| text[..safe].ends_with(prefix))
        .map(|p| p.len())
        .max()
        .unwrap_or(0);
    safe -= held;
    while !text.is_char_boundary(safe) {
        safe -= 1;
    }
    send_text(a, &text[..safe]);
    false
}

fn finish(a: &mut Active, tokenizer: &Tokenizer, reason: FinishReason) {
    let text = decoded(a, tokenizer);
    send_text(a, &text);
    let _ = a.request.events.send(GenEvent::Done { finish_reason: reason, completion_tokens: a.generated.len() });
}

fn decoded(a: &Active, tokenizer: &Tokenizer) -> String {
    // Ids are picked among the tokenizer's own (see above), so decoding cannot fail.
    tokenizer.decode(&a.generated).unwrap_or_default()
}

fn send_text(a: &mut Active, text: &str) {
    if text.len() > a.sent && text.is_char_boundary(a.sent) {
        let _ = a.request.events.send(GenEvent::Text(text[a.sent..].to_string()));
        a.sent = text.len();
    }
}
