//! Edits of manifest sources that keep everything else as it was: comments, order and layout stay byte for
//! byte (toml_edit). `cairn secret set` writes one app's secret env value with [`set_secret`]; `cairn
//! secret rotate` finds every secret with [`secret_sites`] and writes the re-encrypted ones with
//! [`replace_secrets`].
//!
//! What it must not do: IO (it takes a source and returns the new source; reading, validating the result
//! and writing files are the caller's), change anything but the secret values it is given, or put a
//! manifest's text into an error: toml_edit's full error quotes the source line, which may hold a pasted
//! secret, so only its message is kept.

use std::collections::BTreeMap;
use std::ops::Range;

use toml_edit::{DocumentMut, InlineTable, Item, Table, Value};

use crate::Ciphertext;

/// Why a manifest's source could not be edited. It names the app, never quotes the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("TOML syntax: {0}")]
    Syntax(String),
    #[error("no `[app.{0}]`")]
    NoApp(String),
    #[error("`app.{0}` is not a table")]
    AppNotTable(String),
    #[error("no `env` in app `{0}`")]
    NoEnv(String),
    #[error("`env` of app `{0}` is not a table")]
    EnvNotTable(String),
}

impl EditError {
    fn syntax(e: toml_edit::TomlError) -> Self {
        EditError::Syntax(e.message().to_owned())
    }
}

/// What an env var held before `set` wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    None,
    Secret,
    Plain,
}

/// Writes `key = { secret = """...""" }` into `[app.<app>.env]` of a manifest's source and returns the new
/// source; everything else stays as it was. An existing secret keeps its form (inline table or
/// `[app.<app>.env.<key>]` table, multi-line or escaped string); a plain value is replaced in place, keeping
/// the comments around it.
pub fn set_secret(
    src: &str,
    app: &str,
    key: &str,
    ct: &Ciphertext,
) -> Result<(String, Previous), EditError> {
    let mut doc: DocumentMut = src.parse().map_err(EditError::syntax)?;
    let app_item = doc
        .get_mut("app")
        .and_then(Item::as_table_like_mut)
        .and_then(|t| t.get_mut(app))
        .ok_or_else(|| EditError::NoApp(app.to_owned()))?;
    let app_table = match app_item {
        Item::Table(t) => {
            if !t.contains_key("env") {
                t.insert("env", Item::Table(Table::new()));
            }
            t as &mut dyn toml_edit::TableLike
        }
        Item::Value(Value::InlineTable(t)) => {
            if !t.contains_key("env") {
                t.insert("env", Value::InlineTable(InlineTable::new()));
            }
            t as &mut dyn toml_edit::TableLike
        }
        _ => return Err(EditError::AppNotTable(app.to_owned())),
    };
    let env_item = app_table
        .get_mut("env")
        .ok_or_else(|| EditError::NoEnv(app.to_owned()))?;
    if let Item::Value(Value::InlineTable(t)) = env_item
        && !t.contains_key(key)
        && let Some((_, last)) = t.iter_mut().last()
    {
        // `{ A = "x" }` keeps the space before `}` on "x"; without this the new entry would follow it as
        // `{ A = "x" , KEY = ... }`.
        let d = last.decor_mut();
        if d.suffix()
            .and_then(|s| s.as_str())
            .is_some_and(|s| s.bytes().all(|b| b == b' ' || b == b'\t'))
        {
            d.set_suffix("");
        }
    }
    let env = env_item
        .as_table_like_mut()
        .ok_or_else(|| EditError::EnvNotTable(app.to_owned()))?;
    let Some(item) = env.get_mut(key) else {
        env.insert(key, Item::Value(secret_inline_table(ct)));
        return Ok((doc.to_string(), Previous::None));
    };
    if let Some(old) = item
        .as_table_like_mut()
        .and_then(|t| t.get_mut("secret"))
        .and_then(Item::as_value_mut)
        && old.is_str()
    {
        *old = ciphertext_like(old, ct);
        return Ok((doc.to_string(), Previous::Secret));
    }
    match item {
        Item::Value(v) => {
            let decor = v.decor().clone();
            *v = secret_inline_table(ct);
            *v.decor_mut() = decor;
        }
        other => *other = Item::Value(secret_inline_table(ct)),
    }
    Ok((doc.to_string(), Previous::Plain))
}

/// Whether `s` can go between `"""` delimiters unchanged: armored age output always can (base64, dashes,
/// spaces, newlines), but a ciphertext is data from a file, so check.
fn fits_multiline(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=- \n".contains(&b))
}

/// `{ secret = """<newline><armored ciphertext>""" }`: the form `set` writes. TOML 1.0 allows the newlines
/// of a multi-line string inside an inline table (they are "valid within a value"), so the secret stays a
/// one-key value in `[app.NAME.env]` beside the plain ones, and the armor keeps its lines.
fn secret_inline_table(ct: &Ciphertext) -> Value {
    let text = if fits_multiline(ct.as_str()) {
        format!("{{ secret = \"\"\"\n{}\"\"\" }}", ct.as_str())
    } else {
        let mut t = InlineTable::new();
        t.insert("secret", Value::from(ct.as_str()));
        return Value::InlineTable(t);
    };
    text.parse()
        .expect("a multi-line string of armor characters is valid TOML")
}

/// The ciphertext as a string value in the style of `old` (multi-line, or escaped on one line), with `old`'s
/// surrounding whitespace and comments.
fn ciphertext_like(old: &Value, ct: &Ciphertext) -> Value {
    let raw = match old {
        Value::String(f) => f.as_repr().and_then(|r| r.as_raw().as_str()).unwrap_or(""),
        _ => "",
    };
    let multiline = raw.starts_with("\"\"\"") || raw.starts_with("'''");
    let mut new: Value = if multiline && fits_multiline(ct.as_str()) {
        let q = &raw[..3];
        format!("{q}\n{}{q}", ct.as_str())
            .parse()
            .expect("a multi-line string of armor characters is valid TOML")
    } else {
        // toml_edit escapes the newlines when the old value was on one line.
        let escaped = ct.as_str().replace('\n', "\\n");
        format!("\"{escaped}\"")
            .parse()
            .unwrap_or_else(|_| Value::from(ct.as_str()))
    };
    *new.decor_mut() = old.decor().clone();
    new
}

/// One secret env value in a manifest, found with toml_edit (which keeps the spans of the source).
#[derive(Debug)]
pub struct SecretSite {
    pub app: String,
    pub key: String,
    /// Where the `secret` string is in the manifest's source (for a diagnostic).
    pub span: Range<usize>,
    /// The ciphertext as written (armored).
    pub armored: String,
}

/// Every `secret` of every `[app.*.env]` of a manifest's source, in file order.
pub fn secret_sites(src: &str) -> Result<Vec<SecretSite>, EditError> {
    let doc = toml_edit::Document::parse(src).map_err(EditError::syntax)?;
    Ok(sites_in(&doc))
}

/// The [`SecretSite::key`] of an app's own certificate key (`tls = { key = { secret = ... } }`): never an
/// env var name, which holds no `.`.
pub const TLS_KEY_SITE: &str = "tls.key";

/// The `secret` item of an app's own certificate key, if it has one.
fn tls_key_secret(app: &Item) -> Option<&Item> {
    app.as_table_like()?
        .get("tls")?
        .as_table_like()?
        .get("key")?
        .as_table_like()?
        .get("secret")
}

fn sites_in(doc: &toml_edit::Document<&str>) -> Vec<SecretSite> {
    let mut out = Vec::new();
    let Some(apps) = doc.get("app").and_then(Item::as_table_like) else {
        return out;
    };
    for (app, item) in apps.iter() {
        if let Some(s) = tls_key_secret(item)
            && let Some(text) = s.as_str()
        {
            out.push(SecretSite {
                app: app.to_owned(),
                key: TLS_KEY_SITE.to_owned(),
                span: s.span().unwrap_or(0..0),
                armored: text.to_owned(),
            });
        }
        let Some(env) = item
            .as_table_like()
            .and_then(|t| t.get("env"))
            .and_then(Item::as_table_like)
        else {
            continue;
        };
        for (key, v) in env.iter() {
            if let Some(s) = v.as_table_like().and_then(|t| t.get("secret"))
                && let Some(text) = s.as_str()
            {
                out.push(SecretSite {
                    app: app.to_owned(),
                    key: key.to_owned(),
                    span: s.span().unwrap_or(0..0),
                    armored: text.to_owned(),
                });
            }
        }
    }
    out.sort_by_key(|s| s.span.start);
    out
}

/// Replaces the ciphertext of every secret named in `new` (by app and key) in a manifest's source, keeping
/// each one's style and everything else; returns the new source and how many secrets it replaced.
pub fn replace_secrets(
    src: &str,
    new: &BTreeMap<(String, String), Ciphertext>,
) -> Result<(String, usize), EditError> {
    let mut doc: DocumentMut = src.parse().map_err(EditError::syntax)?;
    let n = replace_in(&mut doc, new);
    Ok((doc.to_string(), n))
}

fn replace_in(doc: &mut DocumentMut, new: &BTreeMap<(String, String), Ciphertext>) -> usize {
    let mut n = 0;
    let Some(apps) = doc.get_mut("app").and_then(Item::as_table_like_mut) else {
        return 0;
    };
    for (app, item) in apps.iter_mut() {
        if let Some(ct) = new.get(&(app.get().to_owned(), TLS_KEY_SITE.to_owned()))
            && let Some(old) = item
                .as_table_like_mut()
                .and_then(|t| t.get_mut("tls"))
                .and_then(Item::as_table_like_mut)
                .and_then(|t| t.get_mut("key"))
                .and_then(Item::as_table_like_mut)
                .and_then(|t| t.get_mut("secret"))
                .and_then(Item::as_value_mut)
        {
            *old = ciphertext_like(old, ct);
            n += 1;
        }
        let Some(env) = item
            .as_table_like_mut()
            .and_then(|t| t.get_mut("env"))
            .and_then(Item::as_table_like_mut)
        else {
            continue;
        };
        for (key, v) in env.iter_mut() {
            let Some(ct) = new.get(&(app.get().to_owned(), key.get().to_owned())) else {
                continue;
            };
            if let Some(old) = v
                .as_table_like_mut()
                .and_then(|t| t.get_mut("secret"))
                .and_then(Item::as_value_mut)
            {
                *old = ciphertext_like(old, ct);
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn an_own_certificate_key_is_a_site_and_is_rewritten() {
        let (a, b) = (ct(), ct());
        let src = format!(
            "[app.web]\ntls = {{ cert = \"c.pem\", key = {{ secret = \"\"\"{}\"\"\" }} }}\n",
            a.as_str()
        );
        let sites = secret_sites(&src).unwrap();
        assert_eq!(sites.len(), 1);
        assert_eq!(
            (sites[0].app.as_str(), sites[0].key.as_str()),
            ("web", TLS_KEY_SITE)
        );
        assert_eq!(sites[0].armored, a.as_str());
        let new = BTreeMap::from([(("web".to_owned(), TLS_KEY_SITE.to_owned()), b.clone())]);
        let (out, n) = replace_secrets(&src, &new).unwrap();
        assert_eq!(n, 1);
        assert!(
            out.contains(b.as_str()) && !out.contains(a.as_str()),
            "{out}"
        );
        assert!(out.contains("cert = \"c.pem\""), "{out}");
    }

    fn ct() -> Ciphertext {
        let id = Identity::generate();
        crate::secret::encrypt(b"x", &[id.recipient()]).unwrap()
    }

    #[test]
    fn rewriting_keeps_the_form_of_each_secret() {
        let c = ct();
        let escaped = c.as_str().replace('\n', "\\n");
        let src = format!(
            "[app.a.env]\nX = {{ secret = \"{escaped}\" }} # one line\n\n[app.a.env.Y]\nsecret = '''\n{}'''\n",
            c.as_str()
        );
        let sites = secret_sites(&src).unwrap();
        assert_eq!(
            sites.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
            ["X", "Y"]
        );
        let fresh = ct();
        let new = sites
            .into_iter()
            .map(|s| ((s.app, s.key), fresh.clone()))
            .collect();
        let (out, n) = replace_secrets(&src, &new).unwrap();
        assert_eq!(n, 2);
        let want = src
            .replace(&escaped, &fresh.as_str().replace('\n', "\\n"))
            .replace(c.as_str(), fresh.as_str());
        assert_ne!(out, src);
        assert_eq!(out, want);
    }

    #[test]
    fn set_replaces_a_plain_value_in_place() {
        let c = ct();
        let src = "[app.a]\n# the db\nenv.DB = \"plain\" # note\nenv.OTHER = \"o\"\n";
        let (out, was) = set_secret(src, "a", "DB", &c).unwrap();
        assert_eq!(was, Previous::Plain);
        assert_eq!(
            out,
            format!(
                "[app.a]\n# the db\nenv.DB = {{ secret = \"\"\"\n{}\"\"\" }} # note\nenv.OTHER = \"o\"\n",
                c.as_str()
            )
        );
        assert!(set_secret(src, "b", "DB", &c).is_err());
    }
}
