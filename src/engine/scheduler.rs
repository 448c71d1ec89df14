//! The engine thread: owns the llama context, assigns requests to sequence slots (reusing cached prefixes), and decodes all active sequences in one batch per step.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;
use tokio::sync::mpsc::error::TrySendError;

use super::sampler::{Sampled, TokenFilter, TokenSampler};
use super::text::{StopBuffer, Utf8Stream};
use super::{
    backend, EngineError, EngineEvent, FinishReason, Job, TokenLogprob, TopLogprob, Usage,
};

/// Engine thread configuration.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub slots: usize,
    pub ctx_per_slot: u32,
    pub batch: u32,
    pub threads: usize,
}

/// Entry point of the engine thread.
pub(super) fn run(
    model: Arc<LlamaModel>,
    cfg: Config,
    jobs: Receiver<Job>,
    ready: SyncSender<Result<(), String>>,
) {
    let setup = || -> Result<LlamaContext<'_>, String> {
        let backend = backend()?;
        let slots = u32::try_from(cfg.slots).map_err(|e| e.to_string())?;
        let threads = i32::try_from(cfg.threads).map_err(|e| e.to_string())?;
        let n_ctx = cfg
            .ctx_per_slot
            .checked_mul(slots)
            .and_then(NonZeroU32::new)
            .ok_or("context size overflow")?;
        let params = LlamaContextParams::default()
            .with_n_ctx(Some(n_ctx))
            .with_n_batch(cfg.batch)
            .with_n_ubatch(cfg.batch)
            .with_n_seq_max(slots)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_kv_unified(false);
        model
            .new_context(backend, params)
            .map_err(|e| format!("cannot create llama context: {e}"))
    };
    let mut ctx = match setup() {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let vocab = model.vocab();
    let mut sched = Scheduler::new(&cfg, vocab);
    sched.run(&mut ctx, &jobs);
}

/// A request being decoded in a slot.
struct Active {
    job: Job,
    /// Prompt tokens already in the KV cache (reused or decoded).
    prompt_fed: usize,
    cached: usize,
    generated: u32,
    /// Sampled token not yet decoded.
    next: Option<LlamaToken>,
    /// Batch row holding this sequence's logits after the current decode.
    logit_row: Option<i32>,
    sampler: TokenSampler,
    utf8: Utf8Stream,
    stop: StopBuffer,
    /// Bytes of text produced by the UTF-8 stream so far.
    decoded_len: usize,
    /// Bytes of text sent to the client so far.
    emitted_len: usize,
    /// Logprobs waiting for their text to be emitted: (start, end, entry).
    pending_lp: VecDeque<(usize, usize, TokenLogprob)>,
    first_token_at: Option<std::time::Instant>,
}

/// One llama.cpp sequence and what its KV cache holds.
struct Slot {
    seq: i32,
    /// Tokens whose KV is present at positions 0..len.
    cache: Vec<LlamaToken>,
    last_used: u64,
    active: Option<Box<Active>>,
}

struct Scheduler<'m> {
    slots: Vec<Slot>,
    waiting: VecDeque<Job>,
    vocab: LlamaVocab<'m>,
    ctx_per_slot: usize,
    batch_cap: usize,
    tick: u64,
    closed: bool,
}

enum Step {
    Continue,
    Finish(FinishReason),
}

impl<'m> Scheduler<'m> {
    fn new(cfg: &Config, vocab: LlamaVocab<'m>) -> Self {
        let slots = (0..cfg.slots)
            .map(|i| Slot {
                seq: i32::try_from(i).unwrap_or(i32::MAX),
                cache: Vec::new(),
                last_used: 0,
                active: None,
            })
            .collect();
        Self {
            slots,
            waiting: VecDeque::new(),
            vocab,
            ctx_per_slot: usize::try_from(cfg.ctx_per_slot).unwrap_or(usize::MAX),
            batch_cap: usize::try_from(cfg.batch).unwrap_or(512),
            tick: 0,
            closed: false,
        }
    }

    fn busy(&self) -> bool {
        !self.waiting.is_empty() || self.slots.iter().any(|s| s.active.is_some())
    }

    fn run(&mut self, ctx: &mut LlamaContext<'_>, jobs: &Receiver<Job>) {
        let mut batch = LlamaBatch::new(self.batch_cap, 1);
        loop {
            if !self.busy() {
                if self.closed {
                    return;
                }
                match jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.assign(ctx);
            self.step(ctx, &mut batch);
        }
    }

    /// Frees slots and queue places whose client has gone away.
    fn drop_cancelled(&mut self) {
        self.waiting.retain(|j| !j.tx.is_closed());
        for slot in &mut self.slots {
            if slot.active.as_ref().is_some_and(|a| a.job.tx.is_closed()) {
                slot.active = None;
            }
        }
    }

    /// Moves waiting jobs into free slots, choosing the slot whose cache shares the longest prefix.
    fn assign(&mut self, ctx: &mut LlamaContext<'_>) {
        while !self.waiting.is_empty() {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let best = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.active.is_none())
                .map(|(i, s)| (i, common_prefix(&s.cache, &job.prompt), s.last_used))
                .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)));
            let Some((idx, lcp, _)) = best else {
                break;
            };
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.tick += 1;
            let slot = &mut self.slots[idx];
            // At least the last prompt token must be decoded to get logits.
            let mut reuse = lcp.min(job.prompt.len().saturating_sub(1));
            if reuse < slot.cache.len() {
                let from = u32::try_from(reuse).ok();
                let seq = u32::try_from(slot.seq).ok();
                let ok = ctx.clear_kv_cache_seq(seq, from, None).unwrap_or(false);
                if !ok {
                    let _ = ctx.clear_kv_cache_seq(seq, None, None);
                    reuse = 0;
                }
                slot.cache.truncate(reuse);
            }
            slot.last_used = self.tick;
            let sampler = TokenSampler::new(job.sampling.clone());
            let stop = StopBuffer::new(&job.stop);
            slot.active = Some(Box::new(Active {
                job,
                prompt_fed: reuse,
                cached: reuse,
                generated: 0,
                next: None,
                logit_row: None,
                sampler,
                utf8: Utf8Stream::default(),
                stop,
                decoded_len: 0,
                emitted_len: 0,
                pending_lp: VecDeque::new(),
                first_token_at: None,
            }));
        }
    }

    /// Builds one batch (a token for every generating sequence, then prompt chunks), decodes it,
    /// and samples for every sequence that produced logits.
    fn step(&mut self, ctx: &mut LlamaContext<'_>, batch: &mut LlamaBatch<'_>) {
        batch.clear();
        let mut rows = 0usize;
        let mut involved: Vec<usize> = Vec::new();
        // Decode steps first: ongoing streams never wait behind a long prompt.
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            a.logit_row = None;
            if let Some(tok) = a.next.take() {
                let pos = i32::try_from(slot.cache.len()).unwrap_or(i32::MAX);
                if batch.add(tok, pos, &[slot.seq], true).is_err() {
                    a.next = Some(tok);
                    continue;
                }
                a.logit_row = i32::try_from(rows).ok();
                rows += 1;
                slot.cache.push(tok);
                involved.push(i);
            }
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            let total = a.job.prompt.len();
            if a.prompt_fed >= total || rows >= self.batch_cap {
                continue;
            }
            let take = (total - a.prompt_fed).min(self.batch_cap - rows);
            let mut added = 0;
            for k in a.prompt_fed..a.prompt_fed + take {
                let last = k + 1 == total;
                let pos = i32::try_from(slot.cache.len()).unwrap_or(i32::MAX);
                if batch.add(a.job.prompt[k], pos, &[slot.seq], last).is_err() {
                    break;
                }
                if last {
                    a.logit_row = i32::try_from(rows).ok();
                }
                slot.cache.push(a.job.prompt[k]);
                rows += 1;
                added += 1;
            }
            a.prompt_fed += added;
            if added > 0 {
                involved.push(i);
            }
        }
        if rows == 0 {
            return;
        }
        if let Err(e) = ctx.decode(batch) {
            tracing::error!(error = %e, "llama_decode failed");
            for &i in &involved {
                let slot = &mut self.slots[i];
                if let Some(mut a) = slot.active.take() {
                    send_last(
                        &mut a.job,
                        EngineEvent::Error(EngineError::Internal(e.to_string())),
                    );
                }
                let seq = u32::try_from(slot.seq).ok();
                let _ = ctx.clear_kv_cache_seq(seq, None, None);
                slot.cache.clear();
            }
            return;
        }
        for &i in &involved {
            let slot = &mut self.slots[i];
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            let Some(row) = a.logit_row.take() else {
                continue;
            };
            let logits = ctx.get_logits_ith(row);
            let outcome =
                sample_and_emit(a, logits, &self.vocab, slot.cache.len(), self.ctx_per_slot);
            if let Some(reason) = outcome {
                if let Some(a) = slot.active.take() {
                    finish(*a, reason);
                }
                self.tick += 1;
                slot.last_used = self.tick;
            }
        }
    }
}

/// Samples one token for `a`, streams its text, and says whether the request is done.
/// Returns `Some(reason)` when generation ended (including a vanished client, as `Stop`).
fn sample_and_emit(
    a: &mut Active,
    logits: &[f32],
    vocab: &LlamaVocab<'_>,
    kv_len: usize,
    ctx_per_slot: usize,
) -> Option<FinishReason> {
    let filter = a.job.grammar.as_mut().map(|g| g as &mut dyn TokenFilter);
    let Some(Sampled { token, logprobs }) = a.sampler.sample(logits, filter) else {
        return Some(FinishReason::Stop);
    };
    let token = LlamaToken(token);
    if a.first_token_at.is_none() {
        a.first_token_at = Some(std::time::Instant::now());
        tracing::debug!(
            ttft_ms = a.job.submitted.elapsed().as_millis() as u64,
            prompt_tokens = a.job.prompt.len(),
            cached = a.cached,
            "first token"
        );
    }
    if vocab.is_eog(token) {
        return Some(FinishReason::Stop);
    }
    a.generated += 1;
    let bytes = vocab.token_to_piece(token, false, None);
    if let Some(lp) = logprobs {
        let top_logprobs = lp
            .top
            .iter()
            .map(|&(t, l)| {
                let b = vocab.token_to_piece(LlamaToken(t), false, None);
                TopLogprob {
                    token: String::from_utf8_lossy(&b).into_owned(),
                    bytes: b,
                    logprob: l,
                }
            })
            .collect();
        let entry = TokenLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes: bytes.clone(),
            logprob: lp.logprob,
            top_logprobs,
        };
        let start = a.decoded_len;
        let text = a.utf8.push(&bytes);
        a.decoded_len += text.len();
        a.pending_lp.push_back((start, a.decoded_len, entry));
        if let Step::Finish(r) = push_text(a, &text) {
            return Some(r);
        }
    } else {
        let text = a.utf8.push(&bytes);
        a.decoded_len += text.len();
        if let Step::Finish(r) = push_text(a, &text) {
            return Some(r);
        }
    }
    if a.job.tx.is_closed() {
        return Some(FinishReason::Stop);
    }
    if a.generated >= a.job.max_tokens || kv_len + 1 >= ctx_per_slot {
        return Some(FinishReason::Length);
    }
    a.next = Some(token);
    None
}

/// Runs new text through the stop buffer and sends what can be shown.
fn push_text(a: &mut Active, text: &str) -> Step {
    let step = a.stop.push(text);
    a.emitted_len += step.emit.len();
    if step.stopped {
        // Keep logprobs of tokens that contributed visible text; drop those inside the stop string.
        let limit = a.emitted_len;
        let lps = drain_lp(a, |start, _| start < limit);
        send(a, step.emit, lps);
        a.pending_lp.clear();
        return Step::Finish(FinishReason::Stop);
    }
    let limit = a.emitted_len;
    let lps = drain_lp(a, |_, end| end <= limit);
    if !step.emit.is_empty() || !lps.is_empty() {
        send(a, step.emit, lps);
    }
    Step::Continue
}

fn drain_lp(a: &mut Active, keep: impl Fn(usize, usize) -> bool) -> Vec<TokenLogprob> {
    let mut out = Vec::new();
    while let Some((start, end, _)) = a.pending_lp.front() {
        if !keep(*start, *end) {
            break;
        }
        if let Some((_, _, e)) = a.pending_lp.pop_front() {
            out.push(e);
        }
    }
    out
}

fn send(a: &mut Active, text: String, logprobs: Vec<TokenLogprob>) {
    match a.job.tx.try_send(EngineEvent::Delta { text, logprobs }) {
        Ok(()) | Err(TrySendError::Closed(_)) => {}
        Err(TrySendError::Full(_)) => {
            tracing::warn!("engine event channel full; dropping delta");
        }
    }
}

/// Flushes held text and sends the final event.
fn finish(mut a: Active, mut reason: FinishReason) {
    if a.job.tx.is_closed() {
        return;
    }
    let tail = a.utf8.finish();
    a.decoded_len += tail.len();
    let step = a.stop.push(&tail);
    let mut text = step.emit;
    if step.stopped {
        reason = FinishReason::Stop;
    } else {
        text.push_str(&a.stop.finish());
    }
    a.emitted_len += text.len();
    let limit = a.emitted_len;
    let lps: Vec<TokenLogprob> = a
        .pending_lp
        .drain(..)
        .filter(|(start, end, _)| *start < limit || (*start == *end && *start <= limit))
        .map(|(_, _, e)| e)
        .collect();
    if !text.is_empty() || !lps.is_empty() {
        send(&mut a, text, lps);
    }
    let usage = Usage {
        prompt_tokens: u32::try_from(a.job.prompt.len()).unwrap_or(u32::MAX),
        completion_tokens: a.generated,
        cached_tokens: u32::try_from(a.cached).unwrap_or(u32::MAX),
    };
    send_last(
        &mut a.job,
        EngineEvent::Done {
            finish_reason: reason,
            usage,
        },
    );
}

/// Sends a request's last event (its slot is already free). Its place is returned first, so a
/// request the client sends next is not refused for a place still held.
fn send_last(job: &mut Job, event: EngineEvent) {
    drop(job.permit.take());
    let _ = job.tx.try_send(event);
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
