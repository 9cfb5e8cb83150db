//! S-IDA, "secret sharing made short" (Krawczyk, CRYPTO 1993), as PlanetServe splits a message
//! over several paths: any `k` of the `n` shares rebuild it; fewer than `k` reveal nothing of
//! its content but its length.
//!
//! ```text
//! K      = 32 random bytes (fresh per message)
//! C      = ChaCha20-Poly1305(K, nonce 0, message)          (a key is used once: nonce 0 is safe)
//! pieces = Reed-Solomon(k data + n-k parity shards) of len(C) (u32 LE) || C, zero-padded to k | len
//! keys   = Shamir k-of-n over GF(2^8) of K, byte by byte (share i is the polynomial at x = i + 1)
//! share i = VERSION || i || k || n || keys[i] (32 bytes) || pieces[i]
//! ```
//! What fewer than `k` shares give away: the length of the message (every piece is
//! `ceil((len + 20) / k)` bytes), and nothing else: Shamir's shares below the threshold are
//! uniformly distributed whatever `K` is, so `C` is a ciphertext under an unknown random key,
//! and the Reed-Solomon pieces of `C` are pieces of that ciphertext. With `k` shares, any
//! tampering with a piece or a key share is caught by the AEAD tag (the rebuilt message does
//! not authenticate), never silently accepted. The erasure code is `reed-solomon-erasure`;
//! Shamir's scheme is written here on its GF(2^8) arithmetic (a dozen lines: a polynomial
//! evaluated and interpolated at zero).

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_core::{OsRng, RngCore};
use reed_solomon_erasure::galois_8::{self, ReedSolomon};

use crate::error::{Error, Result};

pub const VERSION: u8 = 1;
const KEY_LEN: usize = 32;
const HEADER_LEN: usize = 4 + KEY_LEN;
/// Shares of one message at most (a path each).
pub const MAX_SHARES: u8 = 16;

fn malformed(detail: impl Into<String>) -> Error {
    Error::Malformed {
        what: "S-IDA share",
        detail: detail.into(),
    }
}

fn check_params(n: u8, k: u8) -> Result<()> {
    if k == 0 || k > n || n > MAX_SHARES {
        return Err(Error::InvalidArgument(format!(
            "a k-of-n split needs 1 <= k <= n <= {MAX_SHARES}, got k = {k}, n = {n}"
        )));
    }
    Ok(())
}

fn codec(n: u8, k: u8) -> Result<Option<ReedSolomon>> {
    if n == k {
        return Ok(None); // no parity: the pieces are the data shards
    }
    ReedSolomon::new(usize::from(k), usize::from(n - k))
        .map(Some)
        .map_err(|error| Error::InvalidArgument(format!("erasure code {k}-of-{n}: {error:?}")))
}

/// Shamir's share of `secret` at `x` (non-zero) under the polynomial whose other coefficients
/// are `coefficients` (degree k - 1), byte by byte: Horner's rule in GF(2^8).
fn shamir_share(secret: &[u8; KEY_LEN], coefficients: &[[u8; KEY_LEN]], x: u8) -> [u8; KEY_LEN] {
    let mut share = [0u8; KEY_LEN];
    for (byte, out) in share.iter_mut().enumerate() {
        let mut value = 0u8;
        for coefficient in coefficients.iter().rev() {
            value = galois_8::add(galois_8::mul(value, x), coefficient[byte]);
        }
        *out = galois_8::add(galois_8::mul(value, x), secret[byte]);
    }
    share
}

/// The polynomial through `points` `(x, value)` (distinct x), evaluated at `at`, byte by byte:
/// Lagrange's formula. At zero it is the secret of `k` shares.
fn interpolate(points: &[(u8, [u8; KEY_LEN])], at: u8) -> [u8; KEY_LEN] {
    let mut result = [0u8; KEY_LEN];
    for (i, (xi, value)) in points.iter().enumerate() {
        // basis_i(at) = prod_{j != i} (at - x_j) / (x_i - x_j); subtraction is addition in GF(2^8)
        let mut basis = 1u8;
        for (j, (xj, _)) in points.iter().enumerate() {
            if i != j {
                basis = galois_8::mul(basis, galois_8::div(galois_8::add(at, *xj), galois_8::add(*xi, *xj)));
            }
        }
        for (out, byte) in result.iter_mut().zip(value) {
            *out = galois_8::add(*out, galois_8::mul(basis, *byte));
        }
    }
    result
}

/// Splits `message` into `n` shares, any `k` of which rebuild it.
pub fn split(message: &[u8], n: u8, k: u8) -> Result<Vec<Vec<u8>>> {
    check_params(n, k)?;
    let mut key = [0u8; KEY_LEN];
    OsRng.fill_bytes(&mut key);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
    let sealed = cipher
        .encrypt(Nonce::from_slice(&[0u8; 12]), message)
        .map_err(|_| Error::InvalidArgument("message too long to seal".into()))?;
    let length = u32::try_from(sealed.len()).map_err(|_| Error::InvalidArgument("message too long".into()))?;
    let mut data = length.to_le_bytes().to_vec();
    data.extend_from_slice(&sealed);
    let piece_len = data.len().div_ceil(usize::from(k));
    data.resize(piece_len * usize::from(k), 0);
    let mut pieces: Vec<Vec<u8>> = data.chunks(piece_len).map(<[u8]>::to_vec).collect();
    pieces.resize(usize::from(n), vec![0u8; piece_len]);
    if let Some(code) = codec(n, k)? {
        code.encode(&mut pieces)
            .map_err(|error| Error::InvalidArgument(format!("erasure coding: {error:?}")))?;
    }
    let mut coefficients = vec![[0u8; KEY_LEN]; usize::from(k - 1)];
    for coefficient in &mut coefficients {
        OsRng.fill_bytes(coefficient);
    }
    Ok(pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let index = u8::try_from(i).expect("n <= MAX_SHARES");
            let mut share = Vec::with_capacity(HEADER_LEN + piece.len());
            share.extend_from_slice(&[VERSION, index, k, n]);
            share.extend_from_slice(&shamir_share(&key, &coefficients, index + 1));
            share.extend_from_slice(&piece);
            share
        })
        .collect())
}

/// What a share says of itself: (index, k, n).
pub fn share_info(share: &[u8]) -> Result<(u8, u8, u8)> {
    if share.len() < HEADER_LEN + 1 {
        return Err(malformed(format!("{} bytes is shorter than a share", share.len())));
    }
    if share[0] != VERSION {
        return Err(malformed(format!("version {} is not {VERSION}", share[0])));
    }
    let (index, k, n) = (share[1], share[2], share[3]);
    check_params(n, k).map_err(|error| malformed(error.to_string()))?;
    if index >= n {
        return Err(malformed(format!("index {index} is not below n = {n}")));
    }
    Ok((index, k, n))
}

/// Rebuilds the message from at least `k` shares of it (any order; duplicates and extra shares
/// beyond `k` are ignored). Fails with [`Error::Authentication`] when a share was tampered with.
pub fn combine(shares: &[&[u8]]) -> Result<Vec<u8>> {
    let first = shares.first().ok_or_else(|| malformed("no shares given"))?;
    let (_, k, n) = share_info(first)?;
    let piece_len = first.len() - HEADER_LEN;
    let mut pieces: Vec<Option<Vec<u8>>> = vec![None; usize::from(n)];
    let mut keys: Vec<(u8, [u8; KEY_LEN])> = Vec::with_capacity(usize::from(k));
    for share in shares {
        let (index, share_k, share_n) = share_info(share)?;
        if (share_k, share_n) != (k, n) || share.len() != first.len() {
            return Err(malformed("shares of different splits"));
        }
        if pieces[usize::from(index)].is_some() || keys.len() == usize::from(k) {
            continue;
        }
        let key: [u8; KEY_LEN] = share[4..HEADER_LEN].try_into().expect("header length");
        keys.push((index + 1, key));
        pieces[usize::from(index)] = Some(share[HEADER_LEN..].to_vec());
    }
    if keys.len() < usize::from(k) {
        return Err(malformed(format!("{} distinct shares; {k} are needed", keys.len())));
    }
    if let Some(code) = codec(n, k)? {
        code.reconstruct_data(&mut pieces)
            .map_err(|error| malformed(format!("erasure decoding: {error:?}")))?;
    }
    let mut data = Vec::with_capacity(piece_len * usize::from(k));
    for piece in pieces.iter().take(usize::from(k)) {
        data.extend_from_slice(piece.as_ref().ok_or_else(|| malformed("a data piece is missing"))?);
    }
    let length = u32::from_le_bytes(data[..4].try_into().expect("piece holds the length")) as usize;
    let sealed = data
        .get(4..4 + length)
        .ok_or_else(|| malformed("the length prefix exceeds the pieces"))?;
    let key = interpolate(&keys, 0);
    ChaCha20Poly1305::new(Key::from_slice(&key))
        .decrypt(Nonce::from_slice(&[0u8; 12]), sealed)
        .map_err(|_| Error::Authentication { what: "S-IDA message" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_k_of_n_rebuild_the_message() {
        let message = b"the request, split over four paths".to_vec();
        let shares = split(&message, 4, 3).unwrap();
        for skip in 0..4 {
            let subset: Vec<&[u8]> = shares
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, s)| &s[..])
                .collect();
            assert_eq!(combine(&subset).unwrap(), message);
        }
        let reversed: Vec<&[u8]> = shares.iter().rev().map(|s| &s[..]).collect();
        assert_eq!(combine(&reversed).unwrap(), message);
    }

    #[test]
    fn fewer_than_k_shares_are_refused() {
        let shares = split(b"secret", 4, 3).unwrap();
        let two: Vec<&[u8]> = vec![&shares[0], &shares[1], &shares[1]];
        assert!(matches!(combine(&two), Err(Error::Malformed { .. })));
    }

    #[test]
    fn below_the_threshold_every_key_is_as_likely() {
        // Two key shares of a 3-of-n split fit every possible key equally well: for each
        // candidate key, exactly one third share completes a polynomial through it, and with
        // that third share the split would rebuild the candidate. So two shares rule nothing out.
        let shares = split(b"what the two paths carry", 4, 3).unwrap();
        let known: Vec<(u8, [u8; KEY_LEN])> = shares[..2]
            .iter()
            .map(|s| (s[1] + 1, s[4..HEADER_LEN].try_into().unwrap()))
            .collect();
        let mut thirds = std::collections::HashSet::new();
        for candidate in 0..=255u8 {
            let mut points = vec![(0u8, [candidate; KEY_LEN])];
            points.extend_from_slice(&known);
            let third = interpolate(&points, 3);
            thirds.insert(third[0]);
            assert_eq!(interpolate(&[known[0], known[1], (3, third)], 0), [candidate; KEY_LEN]);
        }
        assert_eq!(thirds.len(), 256, "each candidate key needs its own third share");
    }

    #[test]
    fn a_tampered_share_fails_authentication() {
        let mut shares = split(b"do not change me", 4, 3).unwrap();
        let last = shares[0].len() - 1;
        shares[0][last] ^= 1; // a piece byte
        shares[1][5] ^= 1; // a key-share byte
        for subset in [vec![0usize, 2, 3], vec![1, 2, 3]] {
            let chosen: Vec<&[u8]> = subset.iter().map(|&i| &shares[i][..]).collect();
            assert!(
                matches!(combine(&chosen), Err(Error::Authentication { .. })),
                "{subset:?}"
            );
        }
    }

    #[test]
    fn bad_parameters_and_shapes_are_refused() {
        assert!(split(b"x", 3, 4).is_err());
        assert!(split(b"x", 17, 3).is_err());
        assert!(split(b"x", 2, 0).is_err());
        assert!(combine(&[]).is_err());
        assert!(combine(&[b"short"]).is_err());
        let a = split(b"one", 4, 3).unwrap();
        let b = split(b"another message", 4, 3).unwrap();
        assert!(combine(&[&a[0], &b[1], &b[2]]).is_err());
        let one_of_one = split(b"single path", 1, 1).unwrap();
        assert_eq!(combine(&[&one_of_one[0]]).unwrap(), b"single path");
        let all = split(b"no parity", 3, 3).unwrap();
        let chosen: Vec<&[u8]> = all.iter().map(|s| &s[..]).collect();
        assert_eq!(combine(&chosen).unwrap(), b"no parity");
    }
}
