//! Published test vectors for every primitive the native core uses, run through the same calls
//! (and, where one exists, the same wrapper) the core uses at run time.
//!
//! - RFC 7748 (X25519): section 5.2 scalar-multiplication vectors and the section 6.1
//!   Diffie-Hellman exchange, through `OnionKey`.
//! - RFC 8439 (ChaCha20-Poly1305): the section 2.8.2 AEAD vector, through the detached in-place
//!   calls the onion layers use.
//! - RFC 8032 (Ed25519): section 7.1 TEST 1, 2, 3 and SHA(abc), through `Identity` and `verify`.
//! - RFC 5869 (HKDF-SHA256): test cases 1 to 3.
//! - BLAKE3: the official vectors (hash, keyed_hash, derive_key, extended output).

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use swarmserve_native::identity::{verify, Identity, OnionKey};
use x25519_dalek::{x25519, PublicKey, StaticSecret};

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.split_whitespace().collect::<String>()).expect("vector is hex")
}

fn h32(s: &str) -> [u8; 32] {
    h(s).try_into().expect("32-byte vector")
}

#[test]
fn rfc7748_section_5_2_scalar_multiplication() {
    let cases = [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ];
    for (scalar, u, expected) in cases {
        assert_eq!(x25519(h32(scalar), h32(u)), h32(expected));
    }
}

#[test]
fn rfc7748_section_6_1_diffie_hellman() {
    let alice = OnionKey::from_bytes(&h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")).unwrap();
    let bob = OnionKey::from_bytes(&h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")).unwrap();
    assert_eq!(
        alice.public_key(),
        h32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    );
    assert_eq!(
        bob.public_key(),
        h32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    );
    let shared = h32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    let a = StaticSecret::from(*alice.secret_bytes());
    let b = StaticSecret::from(*bob.secret_bytes());
    assert_eq!(a.diffie_hellman(&PublicKey::from(bob.public_key())).to_bytes(), shared);
    assert_eq!(
        b.diffie_hellman(&PublicKey::from(alice.public_key())).to_bytes(),
        shared
    );
}

#[test]
fn rfc8439_section_2_8_2_aead() {
    let key = h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce = h("070000004041424344454647");
    let aad = h("50515253c0c1c2c3c4c5c6c7");
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let ciphertext = h("
        d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
        3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
        92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
        3ff4def08e4b7a9de576d26586cec64b6116");
    let tag = h("1ae10b594f09e26a7e902ecbd0600691");

    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
    let mut buffer = plaintext.to_vec();
    let got_tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buffer)
        .unwrap();
    assert_eq!(buffer, ciphertext);
    assert_eq!(got_tag.as_slice(), &tag[..]);
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buffer, &got_tag)
        .unwrap();
    assert_eq!(buffer, plaintext);
}

#[test]
fn rfc8032_section_7_1_ed25519() {
    let cases = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
        (
            "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
            "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
            "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
        ),
    ];
    for (secret, public, message, signature) in cases {
        let identity = Identity::from_seed(&h(secret)).unwrap();
        assert_eq!(identity.public_key().to_vec(), h(public));
        assert_eq!(identity.sign(&h(message)).to_vec(), h(signature));
        verify(&h(public), &h(message), &h(signature)).unwrap();
        let mut forged = h(signature);
        forged[0] ^= 1;
        assert!(verify(&h(public), &h(message), &forged).is_err());
    }
}

#[test]
fn rfc5869_hkdf_sha256() {
    let cases = [
        (
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "000102030405060708090a0b0c",
            "f0f1f2f3f4f5f6f7f8f9",
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f
             202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f
             404142434445464748494a4b4c4d4e4f",
            "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f
             808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f
             a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
            "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf
             d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef
             f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
            "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c
             59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71
             cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "",
            "",
            "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ];
    for (ikm, salt, info, prk, okm) in cases {
        let salt = h(salt);
        let (got_prk, hk) = Hkdf::<Sha256>::extract(if salt.is_empty() { None } else { Some(&salt) }, &h(ikm));
        assert_eq!(got_prk.to_vec(), h(prk));
        let mut got_okm = vec![0u8; h(okm).len()];
        hk.expand(&h(info), &mut got_okm).unwrap();
        assert_eq!(got_okm, h(okm));
    }
}

#[test]
fn blake3_official_vectors() {
    let vectors: serde_json::Value = serde_json::from_str(include_str!("vectors/blake3.json")).unwrap();
    let key: [u8; 32] = vectors["key"].as_str().unwrap().as_bytes().try_into().unwrap();
    let context = vectors["context_string"].as_str().unwrap();
    let cases = vectors["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let input: Vec<u8> = (0..case["input_len"].as_u64().unwrap())
            .map(|i| (i % 251) as u8)
            .collect();
        let expect = |field: &str| h(case[field].as_str().unwrap());

        let mut out = vec![0u8; 131];
        blake3::Hasher::new().update(&input).finalize_xof().fill(&mut out);
        assert_eq!(out, expect("hash"));
        assert_eq!(blake3::hash(&input).as_bytes()[..], expect("hash")[..32]);

        blake3::Hasher::new_keyed(&key)
            .update(&input)
            .finalize_xof()
            .fill(&mut out);
        assert_eq!(out, expect("keyed_hash"));
        assert_eq!(
            blake3::keyed_hash(&key, &input).as_bytes()[..],
            expect("keyed_hash")[..32]
        );

        blake3::Hasher::new_derive_key(context)
            .update(&input)
            .finalize_xof()
            .fill(&mut out);
        assert_eq!(out, expect("derive_key"));
        assert_eq!(blake3::derive_key(context, &input)[..], expect("derive_key")[..32]);
    }
}
