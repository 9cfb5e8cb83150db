//! Node identity (Ed25519) and onion keys (X25519), and their key files.
//!
//! Both keys are stored as PKCS#8 PEM (RFC 8410), so standard tools (`openssl pkey`, the
//! `cryptography` package) read them too. Files are written atomically with mode 0600, and a
//! key file that group or others can read is refused when loaded, as ssh does.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use pkcs8::der::pem::LineEnding;
use pkcs8::der::{Decode, Document, EncodePem};
use pkcs8::{ObjectIdentifier, PrivateKeyInfo};
use rand_core::OsRng;
use x25519_dalek::{PublicKey as X25519Public, StaticSecret};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

pub const PUBLIC_KEY_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;
pub const NODE_ID_CONTEXT: &str = "swarmserve v1 node id";

/// RFC 8410 object identifiers.
const X25519_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.110");
const ED25519_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// Encodes a 32-byte private key as RFC 8410 PKCS#8 v1 PEM: the form every common tool reads
/// (v2, with the public key appended, is refused by some).
fn encode_pkcs8(oid: ObjectIdentifier, name: &str, secret: &[u8; 32]) -> Result<Zeroizing<String>> {
    // The private key field holds the key bytes wrapped in an OCTET STRING.
    let mut wrapped = Zeroizing::new([0u8; 34]);
    wrapped[0] = 0x04;
    wrapped[1] = 0x20;
    wrapped[2..].copy_from_slice(secret);
    PrivateKeyInfo::new(
        pkcs8::AlgorithmIdentifierRef { oid, parameters: None },
        wrapped.as_ref(),
    )
    .to_pem(LineEnding::LF)
    .map(Zeroizing::new)
    .map_err(|e| Error::InvalidKey(format!("cannot encode {name} key as PKCS#8: {e}")))
}

/// Decodes an RFC 8410 PKCS#8 (v1 or v2) PEM private key of the given algorithm.
fn decode_pkcs8(oid: ObjectIdentifier, name: &str, pem: &str) -> Result<Zeroizing<[u8; 32]>> {
    let bad = |e: String| Error::InvalidKey(format!("not an {name} PKCS#8 PEM private key: {e}"));
    let (label, doc) = Document::from_pem(pem).map_err(|e| bad(e.to_string()))?;
    if label != "PRIVATE KEY" {
        return Err(bad(format!("PEM label is {label:?}, expected \"PRIVATE KEY\"")));
    }
    let info = PrivateKeyInfo::from_der(doc.as_bytes()).map_err(|e| bad(e.to_string()))?;
    if info.algorithm.oid != oid {
        return Err(bad(format!("algorithm is {}, expected {oid}", info.algorithm.oid)));
    }
    match info.private_key {
        [0x04, 0x20, key @ ..] if key.len() == 32 => {
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(key);
            Ok(out)
        }
        _ => Err(bad("private key field is not a 32-byte OCTET STRING".into())),
    }
}

fn array32(what: &str, bytes: &[u8]) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| Error::InvalidKey(format!("{what} must be 32 bytes, got {}", bytes.len())))
}

/// The node id for an Ed25519 public key: lowercase hex of BLAKE3 `derive_key` over the key.
pub fn node_id(public_key: &[u8]) -> Result<String> {
    let key = array32("Ed25519 public key", public_key)?;
    let digest = blake3::derive_key(NODE_ID_CONTEXT, &key);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Verifies an Ed25519 signature in strict mode (RFC 8032 with the canonical-encoding and
/// small-order checks of `verify_strict`), so one message has one valid signature per key.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<()> {
    let key = VerifyingKey::from_bytes(&array32("Ed25519 public key", public_key)?)
        .map_err(|e| Error::InvalidKey(format!("Ed25519 public key is not a valid point: {e}")))?;
    let signature: [u8; SIGNATURE_LEN] = signature.try_into().map_err(|_| {
        Error::Signature(format!(
            "signature must be {SIGNATURE_LEN} bytes, got {}",
            signature.len()
        ))
    })?;
    key.verify_strict(message, &Signature::from_bytes(&signature))
        .map_err(|_| Error::Signature("the signature does not match this message and public key".into()))
}

/// A node's long-term Ed25519 identity.
pub struct Identity {
    signing: SigningKey,
}

impl Identity {
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut OsRng),
        }
    }

    pub fn from_seed(seed: &[u8]) -> Result<Self> {
        Ok(Self {
            signing: SigningKey::from_bytes(&array32("Ed25519 seed", seed)?),
        })
    }

    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn node_id(&self) -> String {
        node_id(&self.public_key()).expect("a verifying key is always 32 bytes")
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    pub fn to_pem(&self) -> Result<Zeroizing<String>> {
        encode_pkcs8(ED25519_OID, "Ed25519", &self.seed())
    }

    pub fn from_pem(pem: &str) -> Result<Self> {
        Self::from_seed(decode_pkcs8(ED25519_OID, "Ed25519", pem)?.as_ref())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_secret_file(path, self.to_pem()?.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::from_pem(&read_secret_file(path)?)
    }
}

/// A relay's (or inference node's) X25519 onion key, published in its descriptor.
pub struct OnionKey {
    pub(crate) secret: StaticSecret,
    /// Cached: peeling a set-up needs it, and deriving it costs a scalar multiplication.
    public: [u8; 32],
}

impl OnionKey {
    pub fn generate() -> Self {
        StaticSecret::random_from_rng(OsRng).into()
    }

    pub fn from_bytes(secret: &[u8]) -> Result<Self> {
        Ok(StaticSecret::from(array32("X25519 secret key", secret)?).into())
    }

    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    pub fn to_pem(&self) -> Result<Zeroizing<String>> {
        encode_pkcs8(X25519_OID, "X25519", &self.secret_bytes())
    }

    pub fn from_pem(pem: &str) -> Result<Self> {
        Self::from_bytes(decode_pkcs8(X25519_OID, "X25519", pem)?.as_ref())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_secret_file(path, self.to_pem()?.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::from_pem(&read_secret_file(path)?)
    }
}

impl From<StaticSecret> for OnionKey {
    fn from(secret: StaticSecret) -> Self {
        let public = X25519Public::from(&secret).to_bytes();
        OnionKey { secret, public }
    }
}

fn key_file_error(path: &Path, detail: impl ToString) -> Error {
    Error::KeyFile {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// Writes a secret to `path` with mode 0600: into a temporary file created with that mode
/// (never world-readable, not even briefly), synced, then renamed over the target.
fn write_secret_file(path: &Path, contents: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| key_file_error(path, "not a file path"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(key_file_error(path, e));
    }
    Ok(())
}

fn read_secret_file(path: &Path) -> Result<Zeroizing<String>> {
    let metadata = fs::metadata(path).map_err(|e| key_file_error(path, e))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_file_error(
            path,
            format!("mode {mode:04o} lets group or others read a secret key; run `chmod 600` on it"),
        ));
    }
    fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| key_file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("swarmserve-native-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn identity_round_trips_through_a_0600_file() {
        let dir = temp_dir("identity");
        let path = dir.join("node.key");
        let id = Identity::generate();
        id.save(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.public_key(), id.public_key());
        let sig = loaded.sign(b"hello");
        verify(&id.public_key(), b"hello", &sig).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_a_key_file_others_can_read() {
        let dir = temp_dir("perms");
        let path = dir.join("node.key");
        Identity::generate().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).err().unwrap();
        assert!(matches!(err, Error::KeyFile { .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn onion_key_round_trips_through_pem() {
        let key = OnionKey::generate();
        let pem = key.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(OnionKey::from_pem(&pem).unwrap().public_key(), key.public_key());
        // An Ed25519 PEM is not an X25519 key.
        let ed = Identity::generate().to_pem().unwrap();
        assert!(matches!(OnionKey::from_pem(&ed), Err(Error::InvalidKey(_))));
        assert!(matches!(Identity::from_pem(&pem), Err(Error::InvalidKey(_))));
    }

    #[test]
    fn verify_rejects_wrong_message_key_and_length() {
        let id = Identity::generate();
        let sig = id.sign(b"m");
        assert!(matches!(verify(&id.public_key(), b"n", &sig), Err(Error::Signature(_))));
        assert!(matches!(
            verify(&Identity::generate().public_key(), b"m", &sig),
            Err(Error::Signature(_))
        ));
        assert!(matches!(
            verify(&id.public_key(), b"m", &sig[..63]),
            Err(Error::Signature(_))
        ));
        assert!(matches!(
            verify(&id.public_key()[..31], b"m", &sig),
            Err(Error::InvalidKey(_))
        ));
    }

    #[test]
    fn node_id_is_stable_hex() {
        let id = Identity::from_seed(&[7; 32]).unwrap();
        assert_eq!(id.node_id().len(), 64);
        assert_eq!(id.node_id(), node_id(&id.public_key()).unwrap());
    }
}
