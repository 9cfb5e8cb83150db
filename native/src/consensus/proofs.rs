//! What any node can check from bytes alone, given the committee: that a block was finalized
//! (its finalization certificate carries signatures of a 2f+1 quorum of the committee over the
//! block's digest), and that a validator equivocated (two of its own signed votes that
//! contradict each other in one view). Followers use the first to accept blocks from any peer;
//! the ledger uses the second to slash on evidence alone.

use super::application::Scheme;
use super::CONSENSUS_NAMESPACE;
use commonware_codec::{Copying, DecodeExt, Encode, Read};
use commonware_consensus::simplex::types::{
    Activity, Attributable, ConflictingNotarize, Finalization, Notarize, Proposal,
};
use commonware_consensus::types::{Epoch, Round, View};
use commonware_consensus::{Epochable, Viewable};
use commonware_cryptography::{certificate::Verifier as _, ed25519, sha256::Digest};
use commonware_parallel::Sequential;
use commonware_utils::ordered::{Quorum, Set};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("malformed committee: {0}")]
    Committee(String),
    #[error("malformed proof: {0}")]
    Malformed(String),
    #[error("the signatures do not verify against the committee")]
    Invalid,
    #[error("this is not evidence of conflicting votes")]
    NotEvidence,
}

/// What a finalization certificate proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    pub epoch: u64,
    pub view: u64,
    pub digest: [u8; 32],
}

/// What a piece of equivocation evidence proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Equivocation {
    pub kind: &'static str,
    pub epoch: u64,
    pub view: u64,
    pub validator: [u8; 32],
}

fn committee(validators: &[[u8; 32]]) -> Result<Set<ed25519::PublicKey>, ProofError> {
    let keys = validators
        .iter()
        .map(|k| ed25519::PublicKey::decode(Copying(&k[..])).map_err(|e| ProofError::Committee(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    Set::try_from(keys).map_err(|_| ProofError::Committee("a validator is listed twice".into()))
}

/// Checks a finalization certificate against the committee.
pub fn verify_finalization(validators: &[[u8; 32]], certificate: &[u8]) -> Result<Finalized, ProofError> {
    let participants = committee(validators)?;
    let verifier = Scheme::verifier(CONSENSUS_NAMESPACE, participants);
    let finalization =
        Finalization::<Scheme, Digest>::read_cfg(&mut Copying(certificate), &verifier.certificate_codec_config())
            .map_err(|e| ProofError::Malformed(e.to_string()))?;
    if finalization.encode().as_ref() != certificate {
        return Err(ProofError::Malformed("trailing or non-canonical bytes".into()));
    }
    if !finalization.verify(&mut commonware_utils::sys_rng(), &verifier, &Sequential) {
        return Err(ProofError::Invalid);
    }
    Ok(Finalized {
        epoch: finalization.epoch().get(),
        view: finalization.view().get(),
        digest: finalization.proposal.payload.as_ref().try_into().expect("sha256"),
    })
}

/// The epoch evidence of conflicting votes names, read without checking it (to pick the
/// committee to check it against).
pub fn equivocation_epoch(evidence: &[u8]) -> Result<u64, ProofError> {
    let activity = Activity::<Scheme, Digest>::read_cfg(
        &mut Copying(evidence),
        &<Scheme as commonware_cryptography::certificate::Verifier>::certificate_codec_config_unbounded(),
    )
    .map_err(|e| ProofError::Malformed(e.to_string()))?;
    Ok(activity.epoch().get())
}

/// Checks evidence of conflicting votes against the committee and names the validator.
pub fn verify_equivocation(validators: &[[u8; 32]], evidence: &[u8]) -> Result<Equivocation, ProofError> {
    let participants = committee(validators)?;
    let verifier = Scheme::verifier(CONSENSUS_NAMESPACE, participants.clone());
    let activity = Activity::<Scheme, Digest>::read_cfg(&mut Copying(evidence), &verifier.certificate_codec_config())
        .map_err(|e| ProofError::Malformed(e.to_string()))?;
    if activity.encode().as_ref() != evidence {
        return Err(ProofError::Malformed("trailing or non-canonical bytes".into()));
    }
    let (kind, signer) = match &activity {
        Activity::ConflictingNotarize(e) => ("conflicting notarize", e.signer()),
        Activity::ConflictingFinalize(e) => ("conflicting finalize", e.signer()),
        Activity::NullifyFinalize(e) => ("nullify and finalize", e.signer()),
        _ => return Err(ProofError::NotEvidence),
    };
    if !activity.verify(&mut commonware_utils::sys_rng(), &verifier, &Sequential) {
        return Err(ProofError::Invalid);
    }
    let validator = participants.key(signer).ok_or(ProofError::Invalid)?;
    Ok(Equivocation {
        kind,
        epoch: activity.epoch().get(),
        view: activity.view().get(),
        validator: validator.encode().as_ref().try_into().expect("ed25519 key"),
    })
}

/// Two notarize votes for different blocks in one view, signed with a validator's key (its
/// 32-byte seed), encoded as the evidence honest validators report: what an equivocating
/// validator produces. For adversarial tests of the ledger's response; an honest node never
/// signs this.
pub fn sign_conflicting_notarize(
    validators: &[[u8; 32]],
    seed: &[u8; 32],
    epoch: u64,
    view: u64,
) -> Result<Vec<u8>, ProofError> {
    let participants = committee(validators)?;
    let signer = ed25519::PrivateKey::decode(Copying(&seed[..])).map_err(|e| ProofError::Malformed(e.to_string()))?;
    let scheme = Scheme::signer(CONSENSUS_NAMESPACE, participants, signer)
        .ok_or_else(|| ProofError::Committee("the key is not in the committee".into()))?;
    let round = Round::new(Epoch::new(epoch), View::new(view));
    let parent = View::new(view.saturating_sub(1));
    let vote = |payload: [u8; 32]| {
        let digest = Digest::decode(Copying(&payload[..])).expect("32 bytes");
        Notarize::sign(&scheme, Proposal::new(round, parent, digest)).ok_or(ProofError::Invalid)
    };
    let conflict = ConflictingNotarize::new(vote([1; 32])?, vote([2; 32])?);
    Ok(Activity::ConflictingNotarize(conflict).encode().to_vec())
}
