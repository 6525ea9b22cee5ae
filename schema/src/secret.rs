//! Secrets with age: the in-memory secret type, armored ciphertexts, X25519 identities and recipients,
//! and the keyed fingerprint the planner uses to notice that a secret's plaintext changed without ever
//! holding the plaintext in a plan.
//!
//! Pure functions over bytes: reading identity files and stdin is the caller's business.

use std::borrow::Cow;
use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use age::armor::{ArmoredReader, ArmoredWriter, Format};
use age::secrecy::ExposeSecret;
use hmac::{Hmac, Mac};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Plaintext secret material. Debug and Display print `<redacted>`; the bytes are zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }
    /// The plaintext. Call this only where the value is handed to the app that needs it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// The plaintext as UTF-8, for env vars.
    pub fn expose_str(&self) -> Result<&str, SecretError> {
        std::str::from_utf8(&self.0).map_err(|_| SecretError::NotUtf8)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What can go wrong with secrets. No variant ever carries plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("not an ASCII-armored age ciphertext (it must start with `{ARMOR_BEGIN}`)")]
    NotArmored,
    #[error("`{0}` is not an age X25519 recipient (age1...)")]
    BadRecipient(String),
    #[error("no age X25519 identity (AGE-SECRET-KEY-1...) found")]
    NoIdentity,
    #[error("an identity line is not a valid age X25519 identity")]
    BadIdentity,
    #[error("there are no recipients to encrypt to")]
    NoRecipients,
    #[error("the ciphertext does not decrypt with the given identity")]
    NotForThisIdentity,
    #[error("the ciphertext is damaged: {0}")]
    Damaged(String),
    #[error("the decrypted value is not valid UTF-8")]
    NotUtf8,
    #[error("encryption failed: {0}")]
    Encrypt(String),
}

/// The first line of every armored age ciphertext.
pub const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

/// An ASCII-armored age ciphertext as it appears in a manifest. Public data: safe to store and print.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ciphertext(String);

impl Ciphertext {
    pub fn new(s: &str) -> Result<Self, SecretError> {
        let t = s.trim();
        if !t.starts_with(ARMOR_BEGIN) || !t.ends_with("-----END AGE ENCRYPTED FILE-----") {
            return Err(SecretError::NotArmored);
        }
        Ok(Ciphertext(format!("{t}\n")))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ciphertext({} bytes)", self.0.len())
    }
}
impl Serialize for Ciphertext {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for Ciphertext {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        Ciphertext::new(&s).map_err(de::Error::custom)
    }
}
impl JsonSchema for Ciphertext {
    fn schema_name() -> Cow<'static, str> {
        "AgeCiphertext".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^\\s*-----BEGIN AGE ENCRYPTED FILE-----",
            "description": "An ASCII-armored age ciphertext, as `cairn secret encrypt` prints it."
        })
    }
}

/// An age X25519 public key (`age1...`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Recipient(String);

impl Recipient {
    pub fn new(s: &str) -> Result<Self, SecretError> {
        age::x25519::Recipient::from_str(s.trim())
            .map(|r| Recipient(r.to_string()))
            .map_err(|_| SecretError::BadRecipient(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    fn to_age(&self) -> age::x25519::Recipient {
        age::x25519::Recipient::from_str(&self.0).expect("validated at construction")
    }
}
impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
impl Serialize for Recipient {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for Recipient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        Recipient::new(&s).map_err(de::Error::custom)
    }
}
impl JsonSchema for Recipient {
    fn schema_name() -> Cow<'static, str> {
        "AgeRecipient".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^age1[02-9ac-hj-np-z]{58}$",
            "description": "An age X25519 public key."
        })
    }
}

/// An age X25519 identity (private key). Debug never shows the key.
#[derive(Clone)]
pub struct Identity(age::x25519::Identity);

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.recipient())
    }
}

impl Identity {
    pub fn generate() -> Self {
        Identity(age::x25519::Identity::generate())
    }

    /// Parses the contents of an identity file as `age-keygen` writes it: comment lines and one
    /// `AGE-SECRET-KEY-1...` line (the first one is used).
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .ok_or(SecretError::NoIdentity)?;
        age::x25519::Identity::from_str(line)
            .map(Identity)
            .map_err(|_| SecretError::BadIdentity)
    }

    pub fn recipient(&self) -> Recipient {
        Recipient(self.0.to_public().to_string())
    }

    /// The identity file text, in `age-keygen`'s format. Zeroed on drop.
    pub fn to_file_text(&self, created: &str) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "# created: {created}\n# public key: {}\n{}\n",
            self.recipient(),
            self.0.to_string().expose_secret()
        ))
    }

    pub fn decrypt(&self, ct: &Ciphertext) -> Result<Secret, SecretError> {
        let reader = ArmoredReader::new(ct.as_str().as_bytes());
        let dec = age::Decryptor::new(reader).map_err(map_decrypt)?;
        let mut out = Zeroizing::new(Vec::new());
        let mut r = dec
            .decrypt(std::iter::once(&self.0 as &dyn age::Identity))
            .map_err(map_decrypt)?;
        r.read_to_end(&mut out)
            .map_err(|e| SecretError::Damaged(e.kind().to_string()))?;
        Ok(Secret(out))
    }

    /// A keyed fingerprint of a secret's plaintext: equal plaintexts give equal fingerprints under the same
    /// identity whatever the recipients, and nobody without the identity can test a guess against it.
    pub fn fingerprint(&self, plaintext: &Secret) -> String {
        let key = self.fingerprint_key();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_slice()).expect("any key size");
        mac.update(plaintext.expose());
        hex::encode(mac.finalize().into_bytes())
    }

    fn fingerprint_key(&self) -> Zeroizing<Vec<u8>> {
        self.derived_key("cairn secret fingerprint v1")
    }

    /// A 32-byte key for `purpose` derived from this identity: the same identity gives every control plane
    /// holding it the same key, and nobody without the identity can compute it. Each purpose (a fixed
    /// string naming its use and version) gets an unrelated key.
    pub fn derived_key(&self, purpose: &str) -> Zeroizing<Vec<u8>> {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(purpose.as_bytes());
        h.update(b"\0");
        h.update(self.0.to_string().expose_secret().as_bytes());
        Zeroizing::new(h.finalize().to_vec())
    }
}

fn map_decrypt(e: age::DecryptError) -> SecretError {
    match e {
        age::DecryptError::NoMatchingKeys => SecretError::NotForThisIdentity,
        other => SecretError::Damaged(other.to_string()),
    }
}

/// Encrypts `plaintext` to every recipient, as an ASCII-armored age file.
pub fn encrypt(plaintext: &[u8], recipients: &[Recipient]) -> Result<Ciphertext, SecretError> {
    if recipients.is_empty() {
        return Err(SecretError::NoRecipients);
    }
    let ages: Vec<age::x25519::Recipient> = recipients.iter().map(Recipient::to_age).collect();
    let enc = age::Encryptor::with_recipients(ages.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| SecretError::Encrypt(e.to_string()))?;
    let mut out = Vec::new();
    let io = |e: std::io::Error| SecretError::Encrypt(e.to_string());
    let armored = ArmoredWriter::wrap_output(&mut out, Format::AsciiArmor).map_err(io)?;
    let mut w = enc.wrap_output(armored).map_err(io)?;
    w.write_all(plaintext).map_err(io)?;
    w.finish().and_then(|a| a.finish()).map_err(io)?;
    let text = String::from_utf8(out).map_err(|e| SecretError::Encrypt(e.to_string()))?;
    Ciphertext::new(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_redaction() {
        let id = Identity::generate();
        let other = Identity::generate();
        let ct = encrypt(b"hunter2", &[id.recipient()]).unwrap();
        assert!(ct.as_str().starts_with(ARMOR_BEGIN));
        let s = id.decrypt(&ct).unwrap();
        assert_eq!(s.expose(), b"hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
        assert!(!format!("{id:?}").contains("SECRET"));
        assert!(matches!(
            other.decrypt(&ct),
            Err(SecretError::NotForThisIdentity)
        ));
    }

    #[test]
    fn fingerprint_ignores_recipients_and_needs_the_identity() {
        let id = Identity::generate();
        let other = Identity::generate();
        let a = id
            .decrypt(&encrypt(b"v", &[id.recipient()]).unwrap())
            .unwrap();
        let b = id
            .decrypt(&encrypt(b"v", &[id.recipient(), other.recipient()]).unwrap())
            .unwrap();
        assert_eq!(id.fingerprint(&a), id.fingerprint(&b));
        assert_ne!(id.fingerprint(&a), other.fingerprint(&a));
        assert_ne!(
            id.fingerprint(&a),
            id.fingerprint(&Secret::new(b"w".to_vec()))
        );
    }

    #[test]
    fn identity_file_round_trip() {
        let id = Identity::generate();
        let text = id.to_file_text("2026-01-01T00:00:00Z");
        let back = Identity::parse(&text).unwrap();
        assert_eq!(back.recipient(), id.recipient());
        assert!(matches!(
            Identity::parse("# nothing\n"),
            Err(SecretError::NoIdentity)
        ));
    }
}
