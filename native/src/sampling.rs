//! Verifiable sampling: the token choice at every position is a pure function of the model's
//! logits, the sampling parameters, the tokens so far and a uniform number derived from the
//! receipt's seed, so a verifier holding the claimed model can replay it.
//!
//! ```text
//! u_i = BLAKE3-keyed(K_uniform, seed || i)[0..8] as u64 >> 11, / 2^53        (i: completion index)
//! z   = logits, repetition penalty over the last 64 tokens of prompt + completion
//!       (llama.cpp's rule: positive logits divided, negative ones multiplied)
//! greedy (temperature 0):  token = argmax z (lowest id on ties)
//! sampled: p = softmax(z / T), then top-k, then top-p (smallest most-probable set with mass
//!          >= top_p), renormalized; token = the one whose interval of the cumulative
//!          distribution *in token-id order* contains u_i
//! ```
//! Token-id order (not probability order) keeps every interval within a few 1e-4 of where it
//! was when logits move by numerical jitter, so replay on another machine lands in the same
//! token unless `u` sits within that distance of an interval edge; [`Sampler::plausible`] widens
//! the test by [`CDF_TOLERANCE`] (sampled) or [`LOGIT_TOLERANCE`] (greedy) so honest nodes pass.

use std::sync::LazyLock;

use crate::error::{Error, Result};

pub const UNIFORM_CONTEXT: &str = "swarmserve v1 sampling uniform";
/// Tokens of history the repetition penalty looks at (llama-cpp-python's default).
pub const PENALTY_WINDOW: usize = 64;
/// A sampled token is plausible if `u` lies within this distance of its interval. Measured with
/// the embedded model replayed in a batched pass (logits off by up to 1.0): 1.0% of honest
/// positions fell outside at 0.05 (3.3% at 0.02), against 42% for a Q2_K copy.
pub const CDF_TOLERANCE: f64 = 0.05;
/// A greedy token is plausible if its (penalized) logit is within this of the best one (0 of
/// 960 honest positions were outside 0.25 in the same measurement; Q2_K: 34% at 0.5).
pub const LOGIT_TOLERANCE: f32 = 0.5;
/// Probabilities below e^-20 of the best token's are treated as zero: their total mass is below
/// 1e-3 even for a 256k vocabulary, far under [`CDF_TOLERANCE`], and most exp calls are skipped.
const NEGLIGIBLE: f32 = 20.0;

static UNIFORM_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(UNIFORM_CONTEXT, b""));

/// The uniform number in [0, 1) that drives the choice at completion position `position`.
pub fn uniform(seed: u64, position: u64) -> f64 {
    let mut hasher = blake3::Hasher::new_keyed(&UNIFORM_KEY);
    hasher.update(&seed.to_le_bytes());
    hasher.update(&position.to_le_bytes());
    let digest = hasher.finalize();
    let word = u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("32-byte digest"));
    (word >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 1: off.
    pub repetition_penalty: f32,
}

impl SamplingParams {
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(what));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be finite and >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be finite and > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// The sampler of one stream: the provider calls [`Sampler::choose`] at every position, a
/// verifier calls [`Sampler::plausible`] and then [`Sampler::advance`] with the served token.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    history: Vec<u32>,
    position: u64,
}

/// The distribution at one position: tokens with non-zero probability in id order, and their
/// cumulative upper bounds (the last is 1).
struct Distribution {
    tokens: Vec<u32>,
    upper: Vec<f64>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64, prompt: &[u32]) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            seed,
            history: prompt.to_vec(),
            position: 0,
        })
    }

    /// Completion tokens chosen or advanced over so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The uniform number for the current position.
    pub fn current_uniform(&self) -> f64 {
        uniform(self.seed, self.position)
    }

    /// Chooses the token at the current position and moves past it.
    pub fn choose(&mut self, logits: &[f32]) -> Result<u32> {
        let token = if self.params.temperature == 0.0 {
            argmax(&self.penalized(logits)?)
        } else {
            let dist = self.distribution(logits)?;
            let u = self.current_uniform();
            let index = dist
                .upper
                .partition_point(|&upper| upper <= u)
                .min(dist.tokens.len() - 1);
            dist.tokens[index]
        };
        self.advance(token);
        Ok(token)
    }

    /// Every token an honest node with these logits (up to numerical jitter) could have chosen
    /// at the current position, in id order. Does not move.
    pub fn plausible(&self, logits: &[f32]) -> Result<Vec<u32>> {
        if self.params.temperature == 0.0 {
            let z = self.penalized(logits)?;
            let best = z[argmax(&z) as usize];
            return Ok((0..z.len() as u32)
                .filter(|&t| z[t as usize] >= best - LOGIT_TOLERANCE)
                .collect());
        }
        let dist = self.distribution(logits)?;
        let u = self.current_uniform();
        let (low, high) = (u - CDF_TOLERANCE, u + CDF_TOLERANCE);
        let mut lower = 0.0;
        let mut out = Vec::new();
        for (&token, &upper) in dist.tokens.iter().zip(&dist.upper) {
            if upper >= low && lower <= high {
                out.push(token);
            }
            lower = upper;
        }
        Ok(out)
    }

    /// Moves past `token` (the one served at the current position).
    pub fn advance(&mut self, token: u32) {
        self.history.push(token);
        self.position += 1;
    }

    fn penalized(&self, logits: &[f32]) -> Result<Vec<f32>> {
        if logits.is_empty() {
            return Err(Error::InvalidArgument("logits are empty".into()));
        }
        if logits.iter().any(|l| l.is_nan()) {
            return Err(Error::InvalidArgument("logits contain NaN".into()));
        }
        let mut z = logits.to_vec();
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            let window = &self.history[self.history.len().saturating_sub(PENALTY_WINDOW)..];
            let mut seen = window.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &token in &seen {
                if let Some(logit) = z.get_mut(token as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / penalty
                    } else {
                        *logit * penalty
                    };
                }
            }
        }
        Ok(z)
    }

    fn distribution(&self, logits: &[f32]) -> Result<Distribution> {
        let z = self.penalized(logits)?;
        let inverse_t = 1.0 / self.params.temperature;
        let best = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inverse_t;
        // (token, unnormalized probability), id order, negligible ones dropped.
        let mut kept: Vec<(u32, f64)> = z
            .iter()
            .enumerate()
            .filter_map(|(token, &logit)| {
                let scaled = logit * inverse_t - best;
                (scaled > -NEGLIGIBLE).then(|| (token as u32, f64::from(scaled).exp()))
            })
            .collect();
        let top_k = self.params.top_k as usize;
        if top_k > 0 && top_k < kept.len() {
            let mut by_probability = kept.clone();
            by_probability.select_nth_unstable_by(top_k - 1, more_probable);
            let cutoff = by_probability[top_k - 1];
            kept.retain(|entry| more_probable(entry, &cutoff).is_le());
        }
        if self.params.top_p < 1.0 {
            let total: f64 = kept.iter().map(|(_, p)| p).sum();
            let wanted = f64::from(self.params.top_p) * total;
            // The nucleus is a most-probable prefix: sort only the tokens above the smallest
            // probability threshold whose mass already covers it, not the whole vocabulary.
            let mut by_probability: Vec<(u32, f64)> = Vec::new();
            for log_floor in [-2.0f64, -4.0, -8.0, -12.0, f64::NEG_INFINITY] {
                let floor = log_floor.exp(); // relative to the best token's probability (1)
                by_probability = kept.iter().copied().filter(|&(_, p)| p > floor).collect();
                if by_probability.iter().map(|(_, p)| p).sum::<f64>() >= wanted {
                    break;
                }
            }
            by_probability.sort_unstable_by(more_probable);
            let mut mass = 0.0;
            let mut last = by_probability[0];
            for entry in &by_probability {
                mass += entry.1;
                last = *entry;
                if mass >= wanted {
                    break;
                }
            }
            kept.retain(|entry| more_probable(entry, &last).is_le());
        }
        let total: f64 = kept.iter().map(|(_, p)| p).sum();
        let mut cumulative = 0.0;
        let mut upper = Vec::with_capacity(kept.len());
        for (_, p) in &kept {
            cumulative += p / total;
            upper.push(cumulative);
        }
        if let Some(last) = upper.last_mut() {
            *last = 1.0; // no gap at the top from rounding
        }
        Ok(Distribution {
            tokens: kept.into_iter().map(|(t, _)| t).collect(),
            upper,
        })
    }
}

/// Orders by probability, highest first; ties by lower token id first.
fn more_probable(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

fn argmax(z: &[f32]) -> u32 {
    let mut best = 0;
    for (token, &logit) in z.iter().enumerate() {
        if logit > z[best] {
            best = token;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }

    #[test]
    fn uniform_is_deterministic_and_in_range() {
        assert_eq!(uniform(7, 3), uniform(7, 3));
        assert_ne!(uniform(7, 3), uniform(7, 4));
        assert_ne!(uniform(7, 3), uniform(8, 3));
        let mean = (0..10_000).map(|i| uniform(1, i)).sum::<f64>() / 10_000.0;
        assert!((0..10_000).all(|i| (0.0..1.0).contains(&uniform(1, i))));
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn greedy_picks_argmax_and_penalty_applies() {
        let logits = [1.0, 3.0, 2.9, -1.0];
        let mut sampler = Sampler::new(params(0.0), 0, &[]).unwrap();
        assert_eq!(sampler.choose(&logits).unwrap(), 1);
        // Token 1 is now in the history; a penalty of 1.5 makes it 2.0 < 2.9.
        let mut penalized = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.5,
                ..params(0.0)
            },
            0,
            &[1],
        )
        .unwrap();
        assert_eq!(penalized.choose(&logits).unwrap(), 2);
        assert_eq!(
            Sampler::new(params(0.0), 0, &[]).unwrap().plausible(&logits).unwrap(),
            vec![1, 2]
        );
    }

    #[test]
    fn sampled_choice_follows_the_distribution() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]: token 0 iff u < 0.25.
        let logits = [0.0f32, 3f32.ln()];
        let mut zeros = 0;
        let mut sampler = Sampler::new(params(1.0), 42, &[]).unwrap();
        for _ in 0..4000 {
            let u = sampler.current_uniform();
            let token = sampler.choose(&logits).unwrap();
            assert_eq!(token, u32::from(u >= 0.25));
            zeros += usize::from(token == 0);
        }
        assert!((900..1100).contains(&zeros), "{zeros}");
    }

    #[test]
    fn replay_is_robust_to_jitter_and_rejects_other_models() {
        let vocab = 1000;
        // Distinct values, as real logits are (exact ties at the top-p edge would move whole groups).
        // A peaked distribution as language models have: a few favoured tokens over a long tail.
        let model = |favoured: usize| -> Vec<f32> {
            (0..vocab)
                .map(|i| {
                    (i as f32 * 0.618).sin() * 4.0
                        + if i % 97 == favoured {
                            9.0 + i as f32 / 500.0
                        } else {
                            0.0
                        }
                })
                .collect()
        };
        let logits = model(0);
        let jittered: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| l + ((i % 3) as f32 - 1.0) * 1e-3)
            .collect();
        let other = model(13); // another model favours other tokens
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 0.95,
            repetition_penalty: 1.1,
        };
        let (mut provider, mut verifier, mut cheat) = (
            Sampler::new(p, 9, &[1, 2]).unwrap(),
            Sampler::new(p, 9, &[1, 2]).unwrap(),
            Sampler::new(p, 9, &[1, 2]).unwrap(),
        );
        let mut caught = 0;
        for _ in 0..200 {
            let token = provider.choose(&logits).unwrap();
            assert!(verifier.plausible(&jittered).unwrap().contains(&token));
            let cheated = cheat.choose(&other).unwrap();
            caught += usize::from(!verifier.plausible(&jittered).unwrap().contains(&cheated));
            verifier.advance(token);
            cheat = provider.clone();
        }
        assert!(
            caught > 50,
            "a different model was plausible too often: caught {caught}/200"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.0, 3.0, 0.0, -2.0];
        let top_k = Sampler::new(
            SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            0,
            &[],
        )
        .unwrap();
        assert_eq!(top_k.distribution(&logits).unwrap().tokens, vec![0, 1]);
        let top_p = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                ..params(1.0)
            },
            0,
            &[],
        )
        .unwrap();
        assert_eq!(top_p.distribution(&logits).unwrap().tokens, vec![0]);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(Sampler::new(
            SamplingParams {
                top_p: 0.0,
                ..params(1.0)
            },
            0,
            &[]
        )
        .is_err());
        assert!(Sampler::new(params(f32::NAN), 0, &[]).is_err());
        let sampler = Sampler::new(params(1.0), 0, &[]).unwrap();
        assert!(sampler.plausible(&[]).is_err());
        assert!(sampler.plausible(&[0.0, f32::NAN]).is_err());
    }
}
