//! Token sampling over raw logits: OpenAI penalties, temperature, nucleus (top_p), seeded RNG, logprobs, and a grammar hook.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How many of the most likely tokens are sorted before falling back to a full sort for top_p.
const NUCLEUS_FAST_PATH: usize = 256;
/// Tokens whose scaled logit is this far below the best are never sampled (relative weight < 1e-9).
const SKIP_BELOW: f32 = 21.0;
/// Temperatures at or below this are treated as greedy decoding.
const GREEDY_TEMPERATURE: f32 = 1e-4;

/// Sampling settings for one request (already validated by the gateway).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Seed for the RNG; the same seed and inputs give the same output.
    pub seed: Option<u64>,
    /// OpenAI presence penalty (subtracted once from every token already generated).
    pub presence_penalty: f32,
    /// OpenAI frequency penalty (subtracted per occurrence in the generated text).
    pub frequency_penalty: f32,
    /// Return the chosen token's logprob (and this many alternatives, 0-20) when set.
    pub logprobs: Option<u8>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

/// Restricts which tokens may be sampled next (a grammar).
pub trait TokenFilter {
    /// Whether `token` is allowed as the next token.
    fn allows(&mut self, token: i32) -> bool;
    /// Sets the logit of every disallowed token to negative infinity.
    fn mask(&mut self, logits: &mut [f32]);
    /// Advances the filter's state past `token`.
    fn accept(&mut self, token: i32);
}

/// Logprob information for one sampled token (token ids; the caller renders text).
#[derive(Debug, Clone, PartialEq)]
pub struct SampledLogprobs {
    /// Log-probability of the chosen token under the model (after penalties, before temperature).
    pub logprob: f32,
    /// The most likely alternatives, best first.
    pub top: Vec<(i32, f32)>,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// Token id.
    pub token: i32,
    /// Present when logprobs were requested.
    pub logprobs: Option<SampledLogprobs>,
}

/// Per-request sampler state.
#[derive(Debug)]
pub struct TokenSampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<i32, u32>,
    scratch: Vec<f32>,
    probs: Vec<(f32, u32)>,
}

impl TokenSampler {
    /// Creates a sampler; without a seed the RNG is seeded from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Self {
            params,
            rng,
            counts: HashMap::new(),
            scratch: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// Samples the next token from `logits`, honouring `filter` when given. Returns `None` when
    /// no token is possible (every logit masked).
    pub fn sample(
        &mut self,
        logits: &[f32],
        mut filter: Option<&mut dyn TokenFilter>,
    ) -> Option<Sampled> {
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        for (&tok, &n) in &self.counts {
            if let Some(l) = usize::try_from(tok)
                .ok()
                .and_then(|i| self.scratch.get_mut(i))
            {
                *l -= n as f32 * self.params.frequency_penalty + self.params.presence_penalty;
            }
        }
        let log_z = match self.params.logprobs {
            Some(_) => log_sum_exp(&self.scratch),
            None => 0.0,
        };
        let top = match self.params.logprobs {
            Some(k) if k > 0 => top_k(&self.scratch, usize::from(k), log_z),
            _ => Vec::new(),
        };
        let mut chosen = self.choose()?;
        if let Some(f) = filter.as_deref_mut() {
            let tok = i32::try_from(chosen).ok()?;
            if !f.allows(tok) {
                f.mask(&mut self.scratch);
                chosen = self.choose()?;
            }
        }
        // Masking only touches disallowed tokens, so this is the chosen token's penalised logit.
        let chosen_logit = self.scratch.get(chosen).copied();
        let token = i32::try_from(chosen).ok()?;
        if let Some(f) = filter {
            f.accept(token);
        }
        *self.counts.entry(token).or_insert(0) += 1;
        let logprobs = self.params.logprobs.map(|_| SampledLogprobs {
            logprob: chosen_logit.map_or(f32::NEG_INFINITY, |l| l - log_z),
            top,
        });
        Some(Sampled { token, logprobs })
    }

    /// Picks an index from `self.scratch` (greedy or temperature + top_p).
    fn choose(&mut self) -> Option<usize> {
        if self.params.temperature <= GREEDY_TEMPERATURE {
            return argmax(&self.scratch);
        }
        let max = self
            .scratch
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return None;
        }
        let inv_t = 1.0 / self.params.temperature;
        // Tokens this far below the best have probability < e^-SKIP_BELOW relative to it (under
        // 1e-9 of the mass): skipping their exp() keeps the per-token cost low on a 50k vocabulary.
        let floor = max - SKIP_BELOW * self.params.temperature;
        self.probs.clear();
        let mut total = 0.0f64;
        for (i, &l) in self.scratch.iter().enumerate() {
            // NaN, -inf and +inf fail this test too.
            if l > floor && l <= max {
                let p = ((l - max) * inv_t).exp();
                total += f64::from(p);
                self.probs.push((p, i as u32));
            }
        }
        if self.probs.is_empty() {
            return None;
        }
        let top_p = f64::from(self.params.top_p);
        if top_p < 1.0 {
            let target = top_p * total;
            let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
            let k = NUCLEUS_FAST_PATH.min(self.probs.len());
            if k < self.probs.len() {
                self.probs.select_nth_unstable_by(k - 1, cmp);
            }
            self.probs[..k].sort_unstable_by(cmp);
            let head: f64 = self.probs[..k].iter().map(|p| f64::from(p.0)).sum();
            if head < target {
                self.probs.sort_unstable_by(cmp);
            }
            let mut cum = 0.0f64;
            let mut cut = self.probs.len();
            for (n, p) in self.probs.iter().enumerate() {
                cum += f64::from(p.0);
                if cum >= target {
                    cut = n + 1;
                    break;
                }
            }
            self.probs.truncate(cut.max(1));
            total = cum.min(total);
        }
        let mut u = self.rng.gen::<f64>() * total;
        for &(p, i) in &self.probs {
            u -= f64::from(p);
            if u <= 0.0 {
                return Some(i as usize);
            }
        }
        self.probs.last().map(|&(_, i)| i as usize)
    }
}

fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_finite() && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i)
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from((l - max).exp()))
        .sum();
    max + sum.ln() as f32
}

fn top_k(logits: &[f32], k: usize, log_z: f32) -> Vec<(i32, f32)> {
    let mut idx: Vec<(f32, usize)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (l, i))
        .collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_unstable_by(cmp);
    idx.into_iter()
        .filter_map(|(l, i)| i32::try_from(i).ok().map(|t| (t, l - log_z)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, -1.0, 2.5]
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = TokenSampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits(), None).map(|x| x.token), Some(1));
    }

    #[test]
    fn same_seed_same_sequence() {
        let run = |seed| {
            let mut s = TokenSampler::new(SamplingParams {
                seed: Some(seed),
                ..Default::default()
            });
            (0..50)
                .filter_map(|_| s.sample(&logits(), None).map(|x| x.token))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = TokenSampler::new(SamplingParams {
            top_p: 0.01,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits(), None).map(|x| x.token), Some(1));
        }
    }

    #[test]
    fn frequency_penalty_discourages_repeats() {
        let mut s = TokenSampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 2.0,
            ..Default::default()
        });
        let a = s.sample(&logits(), None).map(|x| x.token);
        let b = s.sample(&logits(), None).map(|x| x.token);
        assert_eq!(a, Some(1));
        assert_eq!(b, Some(5)); // 3.0 - 2.0 = 1.0 < 2.5
    }

    #[test]
    fn logprobs_are_normalised() {
        let mut s = TokenSampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            ..Default::default()
        });
        let out = s.sample(&logits(), None).and_then(|x| x.logprobs);
        let lp = out.as_ref().map(|l| l.logprob).unwrap_or(0.0);
        let total: f32 = logits().iter().map(|l| (l - 3.0).exp()).sum();
        assert!((lp - (-(total.ln()))).abs() < 1e-5);
        let top: Vec<i32> = out
            .map(|l| l.top.iter().map(|t| t.0).collect())
            .unwrap_or_default();
        assert_eq!(top, vec![1, 5, 2]);
    }

    struct OnlyEven;
    impl TokenFilter for OnlyEven {
        fn allows(&mut self, token: i32) -> bool {
            token % 2 == 0
        }
        fn mask(&mut self, logits: &mut [f32]) {
            for (i, l) in logits.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        fn accept(&mut self, _token: i32) {}
    }

    #[test]
    fn filter_is_enforced() {
        let mut s = TokenSampler::new(SamplingParams {
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..100 {
            let t = s.sample(&logits(), Some(&mut OnlyEven)).map(|x| x.token);
            assert!(matches!(t, Some(t) if t % 2 == 0));
        }
    }
}
