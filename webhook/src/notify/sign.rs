//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): `webhook-signature: v1,<base64
//! HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`, keyed with the secret's bytes (`whsec_`
//! and base64, as the receiver's libraries take it).
//!
//! What it must not do: show a secret (errors say what is wrong with it, never its text).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing secret that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    #[error("the signing secret is not `whsec_` followed by base64")]
    NotBase64,
    #[error("the signing secret has {0} bytes; it needs between 24 and 64")]
    Length(usize),
}

/// The key bytes of `whsec_<base64>` (the prefix is optional, as in the reference libraries).
pub fn key(secret: &str) -> Result<Vec<u8>, SigningError> {
    let b64 = secret.trim();
    let b64 = b64.strip_prefix(SECRET_PREFIX).unwrap_or(b64);
    let key = STANDARD.decode(b64).map_err(|_| SigningError::NotBase64)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SigningError::Length(key.len()));
    }
    Ok(key)
}

/// The `webhook-signature` header value for a message.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference tests
    /// (`msg_p5jXN8AQM9LWM0D4loKWxJek`, timestamp 1614265330, secret `whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw`).
    #[test]
    fn the_reference_example_signs_as_the_specification_says() {
        let key = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn bad_secrets_are_refused_without_showing_them() {
        assert_eq!(key("whsec_not base64!"), Err(SigningError::NotBase64));
        assert_eq!(key("whsec_AAAA"), Err(SigningError::Length(3)));
        let e = key("whsec_hunter2hunter2").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
