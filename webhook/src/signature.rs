//! Proof that a webhook body came from GitHub: `X-Hub-Signature-256: sha256=<hex>`, the HMAC-SHA256 of
//! the raw body bytes keyed with the webhook secret.
//!
//! What it must not do: accept the legacy SHA-1 `X-Hub-Signature` (or a `sha1=` value), compare
//! signatures in variable time (`verify_slice` is constant-time), look at anything but the exact bytes
//! received (verification comes before any parsing), or let the secret reach a log through `Debug`.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac as _};
use http::HeaderMap;
use secrecy::{ExposeSecret as _, SecretSlice};
use sha2::Sha256;

/// The header GitHub signs deliveries with.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// The legacy SHA-1 header, recognised only to say why it is refused.
pub const LEGACY_SIGNATURE_HEADER: &str = "x-hub-signature";
/// Where `cairn serve` finds the secret when no `--github-webhook-secret-file` is given.
pub const SECRET_ENV: &str = "CAIRN_GITHUB_WEBHOOK_SECRET";

type HmacSha256 = Hmac<Sha256>;

/// The webhook secret shared with GitHub. Never empty; `Debug` does not show it.
pub struct WebhookSecret(SecretSlice<u8>);

impl WebhookSecret {
    /// A secret from its bytes, exactly as entered in GitHub's webhook settings.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<WebhookSecret, SecretError> {
        let secret: Vec<u8> = secret.into();
        if secret.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(WebhookSecret(secret.into()))
    }

    /// Reads the secret from a file (`--github-webhook-secret-file`). One trailing newline (what an
    /// editor or `echo` adds) is not part of the secret.
    pub fn from_file(path: &Path) -> Result<WebhookSecret, SecretError> {
        let mut bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        WebhookSecret::new(bytes).map_err(|_| SecretError::EmptyFile {
            path: path.display().to_string(),
        })
    }

    /// The secret from `file` if given, else from `CAIRN_GITHUB_WEBHOOK_SECRET`; `None` when neither
    /// is set (the webhook endpoint is then not served).
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<WebhookSecret>, SecretError> {
        if let Some(file) = file {
            return WebhookSecret::from_file(file).map(Some);
        }
        match std::env::var_os(SECRET_ENV) {
            None => Ok(None),
            Some(value) if value.is_empty() => Err(SecretError::Empty),
            Some(value) => {
                use std::os::unix::ffi::OsStringExt as _;
                WebhookSecret::new(value.into_vec()).map(Some)
            }
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        HmacSha256::new_from_slice(self.0.expose_secret()).expect("HMAC accepts any key length")
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Why a webhook secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// An empty key would make every signature computable by anyone.
    #[error("the GitHub webhook secret is empty")]
    Empty,
    #[error("the GitHub webhook secret file {path} is empty")]
    EmptyFile { path: String },
    #[error("cannot read the GitHub webhook secret file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a delivery's signature was refused. The texts are safe to send back to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the request has no X-Hub-Signature-256 header")]
    Missing,
    #[error(
        "only a SHA-1 signature was sent; Cairn requires X-Hub-Signature-256 (sha256=...), which \
         GitHub sends when the webhook has a secret"
    )]
    Sha1Only,
    #[error("X-Hub-Signature-256 must be `sha256=` followed by 64 hexadecimal digits")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body for the configured secret")]
    Mismatch,
}

/// The header value GitHub would send for `body`: `sha256=<lowercase hex>`.
pub fn sign(secret: &WebhookSecret, body: &[u8]) -> String {
    let mut mac = secret.mac();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The digest one `X-Hub-Signature-256` value carries.
fn digest(header: &[u8]) -> Result<Vec<u8>, SignatureError> {
    let header = header.trim_ascii();
    let Some(hex_digest) = header.strip_prefix(b"sha256=") else {
        return Err(if header.starts_with(b"sha1=") {
            SignatureError::Sha1Only
        } else {
            SignatureError::Malformed
        });
    };
    if hex_digest.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    hex::decode(hex_digest).map_err(|_| SignatureError::Malformed)
}

/// Verifies one `X-Hub-Signature-256` value against `body`.
pub fn verify(secret: &WebhookSecret, header: &[u8], body: &[u8]) -> Result<(), SignatureError> {
    let digest = digest(header)?;
    let mut mac = secret.mac();
    mac.update(body);
    mac.verify_slice(&digest)
        .map_err(|_| SignatureError::Mismatch)
}

/// Checks, before the body is read, that a request carries exactly one well-formed
/// `X-Hub-Signature-256` (so a request that cannot verify costs no body read). The same refusals as
/// [`verify_headers`], but for `Mismatch`.
pub fn check_headers(headers: &HeaderMap) -> Result<(), SignatureError> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => digest(value.as_bytes()).map(drop),
        (Some(_), Some(_)) => Err(SignatureError::Malformed),
        (None, _) if headers.contains_key(LEGACY_SIGNATURE_HEADER) => Err(SignatureError::Sha1Only),
        (None, _) => Err(SignatureError::Missing),
    }
}

/// Verifies a request's headers against its body: `X-Hub-Signature-256` must be present and match;
/// a request with only the SHA-1 `X-Hub-Signature` is refused as such.
pub fn verify_headers(
    secret: &WebhookSecret,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), SignatureError> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => verify(secret, value.as_bytes(), body),
        // Two signatures: which one would we believe? Neither.
        (Some(_), Some(_)) => Err(SignatureError::Malformed),
        (None, _) if headers.contains_key(LEGACY_SIGNATURE_HEADER) => Err(SignatureError::Sha1Only),
        (None, _) => Err(SignatureError::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn documented_secret() -> WebhookSecret {
        WebhookSecret::new("It's a Secret to Everybody").unwrap()
    }

    const DOCUMENTED: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_documented_test_vector_verifies() {
        let secret = documented_secret();
        assert_eq!(sign(&secret, b"Hello, World!"), DOCUMENTED);
        assert_eq!(
            verify(&secret, DOCUMENTED.as_bytes(), b"Hello, World!"),
            Ok(())
        );
    }

    #[test]
    fn the_documented_signature_fails_for_another_body_or_secret() {
        let secret = documented_secret();
        assert_eq!(
            verify(&secret, DOCUMENTED.as_bytes(), b"Hello, World?"),
            Err(SignatureError::Mismatch)
        );
        let other = WebhookSecret::new("It's a Secret to Nobody").unwrap();
        assert_eq!(
            verify(&other, DOCUMENTED.as_bytes(), b"Hello, World!"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn uppercase_hex_and_surrounding_whitespace_are_accepted() {
        let upper = format!("  sha256={} ", DOCUMENTED["sha256=".len()..].to_uppercase());
        assert_eq!(
            verify(&documented_secret(), upper.as_bytes(), b"Hello, World!"),
            Ok(())
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        let secret = documented_secret();
        for value in [
            "",
            "sha256=",
            "sha256=zz07ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e",
            "sha512=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ] {
            assert_eq!(
                verify(&secret, value.as_bytes(), b"Hello, World!"),
                Err(SignatureError::Malformed),
                "{value:?}"
            );
        }
    }

    #[test]
    fn sha1_only_is_refused_as_such() {
        let secret = documented_secret();
        let mut headers = HeaderMap::new();
        headers.insert(
            LEGACY_SIGNATURE_HEADER,
            HeaderValue::from_static("sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59"),
        );
        assert_eq!(
            verify_headers(&secret, &headers, b"Hello, World!"),
            Err(SignatureError::Sha1Only)
        );
        headers.insert(
            SIGNATURE_HEADER,
            HeaderValue::from_static("sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59"),
        );
        assert_eq!(
            verify_headers(&secret, &headers, b"Hello, World!"),
            Err(SignatureError::Sha1Only)
        );
    }

    #[test]
    fn headers_without_a_signature_are_missing_and_two_signatures_are_refused() {
        let secret = documented_secret();
        let mut headers = HeaderMap::new();
        assert_eq!(
            verify_headers(&secret, &headers, b"Hello, World!"),
            Err(SignatureError::Missing)
        );
        headers.append(SIGNATURE_HEADER, HeaderValue::from_static(DOCUMENTED));
        assert_eq!(verify_headers(&secret, &headers, b"Hello, World!"), Ok(()));
        headers.append(SIGNATURE_HEADER, HeaderValue::from_static(DOCUMENTED));
        assert_eq!(
            verify_headers(&secret, &headers, b"Hello, World!"),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn empty_secrets_are_refused_and_debug_redacts() {
        assert!(matches!(WebhookSecret::new(""), Err(SecretError::Empty)));
        assert_eq!(
            format!("{:?}", documented_secret()),
            "WebhookSecret(<redacted>)"
        );
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline_only() {
        let dir = std::env::temp_dir().join(format!("cairn-webhook-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "It's a Secret to Everybody\n").unwrap();
        let secret = WebhookSecret::from_file(&path).unwrap();
        assert_eq!(sign(&secret, b"Hello, World!"), DOCUMENTED);
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            WebhookSecret::from_file(&path),
            Err(SecretError::EmptyFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
