//! Payment tokens, Privacy Pass style: RFC 9578's privately verifiable tokens, built on RFC 9497's
//! VOPRF over ristretto255 with SHA-512 (Meta's `voprf` crate).
//!
//! A provider (the issuer, and the only redeemer) holds a VOPRF key and publishes its public
//! half. A payer draws random nonces, blinds them, pays for them, and has the provider evaluate
//! the blinded elements; a DLEQ proof shows every one was evaluated under the published key, so
//! a provider cannot mark one payer's tokens with a key of its own. The payer unblinds: each
//! `(nonce, output)` is a token the provider accepts once.
//!
//! # Invariants
//! - The provider sees each blinded element only as a uniformly random group element (the blind
//!   is a fresh random scalar): nothing in a redeemed token links it to the issuance, or to the
//!   payer, it came from. Unlinkability holds among the tokens issued under one key.
//! - Only the holder of the key can make an output that checks (`TokenIssuer::check`): tokens
//!   cannot be forged, and each nonce is spent once (the redeemer keeps the spent nonces).
//! - A payer accepts evaluations only with a proof under the key it expected.

use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;
use voprf::{BlindedElement, EvaluationElement, Group, Proof, Ristretto255, VoprfClient, VoprfServer};

use crate::error::{Error, Result};

type Suite = Ristretto255;

/// Bytes of a token's nonce (what the payer draws).
pub const NONCE_SIZE: usize = 32;
/// Bytes of a token's output (SHA-512).
pub const OUTPUT_SIZE: usize = 64;
/// Bytes of a group element on the wire (blinded and evaluated elements, the public key).
pub const ELEMENT_SIZE: usize = 32;
/// Most tokens one issuance may carry.
pub const MAX_BATCH: usize = 256;
const KEY_INFO: &[u8] = b"swarmserve/v1 payment tokens";

fn malformed(what: &'static str) -> Error {
    Error::Malformed {
        what,
        detail: "not a valid ristretto255 encoding".into(),
    }
}

fn check_batch(count: usize) -> Result<()> {
    if count == 0 || count > MAX_BATCH {
        return Err(Error::InvalidArgument(format!(
            "a token batch holds 1 to {MAX_BATCH} tokens, got {count}"
        )));
    }
    Ok(())
}

/// The provider's side: issues tokens and checks them when they are redeemed.
pub struct TokenIssuer {
    server: VoprfServer<Suite>,
}

impl TokenIssuer {
    /// The issuer whose key derives from `seed` (keep the seed as secret as an identity key).
    pub fn from_seed(seed: &[u8]) -> Result<Self> {
        if seed.len() != 32 {
            return Err(Error::InvalidKey(format!(
                "a token key seed is 32 bytes, got {}",
                seed.len()
            )));
        }
        let server =
            VoprfServer::new_from_seed(seed, KEY_INFO).map_err(|e| Error::InvalidKey(format!("token key: {e}")))?;
        Ok(Self { server })
    }

    pub fn public_key(&self) -> [u8; ELEMENT_SIZE] {
        Suite::serialize_elem(self.server.get_public_key()).into()
    }

    /// Evaluates the payer's blinded elements; returns the evaluated elements and the proof.
    pub fn issue(&self, blinded: &[Vec<u8>]) -> Result<(Vec<[u8; ELEMENT_SIZE]>, Vec<u8>)> {
        check_batch(blinded.len())?;
        let elements = blinded
            .iter()
            .map(|b| BlindedElement::<Suite>::deserialize(b).map_err(|_| malformed("blinded token")))
            .collect::<Result<Vec<_>>>()?;
        let result = self
            .server
            .batch_blind_evaluate(&mut OsRng, &elements)
            .map_err(|e| Error::InvalidArgument(format!("token issuance: {e}")))?;
        let evaluated = result.messages.iter().map(|m| m.serialize().into()).collect();
        Ok((evaluated, result.proof.serialize().to_vec()))
    }

    /// Whether `(nonce, output)` is a token this issuer made (spent or not: the caller keeps
    /// the spent nonces).
    pub fn check(&self, nonce: &[u8], output: &[u8]) -> bool {
        if nonce.len() != NONCE_SIZE || output.len() != OUTPUT_SIZE {
            return false;
        }
        match self.server.evaluate(nonce) {
            Ok(expected) => expected.as_slice().ct_eq(output).into(),
            Err(_) => false,
        }
    }
}

/// The payer's side of one issuance: the nonces and blinds until the evaluations come back.
pub struct TokenRequest {
    nonces: Vec<[u8; NONCE_SIZE]>,
    clients: Vec<VoprfClient<Suite>>,
    blinded: Vec<[u8; ELEMENT_SIZE]>,
}

impl TokenRequest {
    pub fn new(count: usize) -> Result<Self> {
        check_batch(count)?;
        let mut request = Self {
            nonces: Vec::with_capacity(count),
            clients: Vec::with_capacity(count),
            blinded: Vec::with_capacity(count),
        };
        for _ in 0..count {
            let mut nonce = [0u8; NONCE_SIZE];
            OsRng.fill_bytes(&mut nonce);
            let blind = VoprfClient::<Suite>::blind(&nonce, &mut OsRng)
                .map_err(|e| Error::InvalidArgument(format!("token blinding: {e}")))?;
            request.blinded.push(blind.message.serialize().into());
            request.clients.push(blind.state);
            request.nonces.push(nonce);
        }
        Ok(request)
    }

    /// The blinded elements to send to the issuer.
    pub fn blinded(&self) -> &[[u8; ELEMENT_SIZE]] {
        &self.blinded
    }

    /// The tokens, once the issuer's evaluations and proof check out under `public_key`.
    pub fn finalize(
        &self,
        evaluated: &[Vec<u8>],
        proof: &[u8],
        public_key: &[u8],
    ) -> Result<Vec<([u8; NONCE_SIZE], [u8; OUTPUT_SIZE])>> {
        if evaluated.len() != self.clients.len() {
            return Err(Error::InvalidArgument(format!(
                "{} evaluations for {} blinded tokens",
                evaluated.len(),
                self.clients.len()
            )));
        }
        let messages = evaluated
            .iter()
            .map(|e| EvaluationElement::<Suite>::deserialize(e).map_err(|_| malformed("evaluated token")))
            .collect::<Result<Vec<_>>>()?;
        let proof = Proof::<Suite>::deserialize(proof).map_err(|_| malformed("token proof"))?;
        let key = Suite::deserialize_elem(public_key).map_err(|_| malformed("token public key"))?;
        let outputs =
            VoprfClient::batch_finalize(&self.nonces, &self.clients, &messages, &proof, key).map_err(|_| {
                Error::Authentication {
                    what: "token issuance proof",
                }
            })?;
        self.nonces
            .iter()
            .zip(outputs)
            .map(|(nonce, output)| {
                let output = output.map_err(|_| Error::Authentication { what: "token" })?;
                let mut bytes = [0u8; OUTPUT_SIZE];
                bytes.copy_from_slice(&output);
                Ok((*nonce, bytes))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(issuer: &TokenIssuer, count: usize) -> (TokenRequest, Vec<Vec<u8>>, Vec<u8>) {
        let request = TokenRequest::new(count).unwrap();
        let blinded: Vec<Vec<u8>> = request.blinded().iter().map(|b| b.to_vec()).collect();
        let (evaluated, proof) = issuer.issue(&blinded).unwrap();
        (request, evaluated.iter().map(|e| e.to_vec()).collect(), proof)
    }

    #[test]
    fn issued_tokens_check_and_forged_ones_do_not() {
        let issuer = TokenIssuer::from_seed(&[7; 32]).unwrap();
        let (request, evaluated, proof) = issued(&issuer, 8);
        let tokens = request.finalize(&evaluated, &proof, &issuer.public_key()).unwrap();
        assert_eq!(tokens.len(), 8);
        for (nonce, output) in &tokens {
            assert!(issuer.check(nonce, output));
            let mut forged = *output;
            forged[0] ^= 1;
            assert!(!issuer.check(nonce, &forged));
        }
        let other = TokenIssuer::from_seed(&[8; 32]).unwrap();
        assert!(!other.check(&tokens[0].0, &tokens[0].1));
    }

    #[test]
    fn a_proof_under_another_key_is_refused() {
        let issuer = TokenIssuer::from_seed(&[1; 32]).unwrap();
        let tagging = TokenIssuer::from_seed(&[2; 32]).unwrap(); // a key kept for one payer
        let (request, evaluated, proof) = issued(&tagging, 4);
        assert!(matches!(
            request.finalize(&evaluated, &proof, &issuer.public_key()),
            Err(Error::Authentication { .. })
        ));
    }

    #[test]
    fn batch_limits_and_garbage_are_refused() {
        assert!(TokenRequest::new(0).is_err());
        assert!(TokenRequest::new(MAX_BATCH + 1).is_err());
        let issuer = TokenIssuer::from_seed(&[3; 32]).unwrap();
        assert!(matches!(issuer.issue(&[vec![0xFF; 32]]), Err(Error::Malformed { .. })));
        assert!(TokenIssuer::from_seed(&[0; 31]).is_err());
    }
}
