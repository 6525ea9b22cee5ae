//! The headers the proxy removes and sets: hop-by-hop headers (RFC 9110 §7.6.1) and the forwarding
//! headers (`X-Forwarded-For/-Proto/-Host`, `X-Real-IP` and RFC 7239's `Forwarded`).
//!
//! At the public edge every forwarding header a client sent is replaced (never appended to: a client
//! could otherwise claim any address); across the authenticated internal hop the first node's values are
//! carried over, so the app sees the original client, scheme and host whichever node served it.
//!
//! What it must not do: trust a forwarding header from anyone but an authenticated hop.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::cluster::HOP_HEADER;

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Whether the request asks to switch protocols (HTTP/1.1 `Connection: upgrade` with `Upgrade`).
pub(super) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers and those `Connection` names; with `upgrade`, the `Upgrade` header stays and
/// `Connection: upgrade` is set again, so the next hop sees the protocol switch.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let kept_upgrade = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(u) = kept_upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Who the request came from, as the first node saw it.
#[derive(Debug, Clone)]
pub(super) struct Origin {
    pub client: IpAddr,
    pub https: bool,
    /// The `Host` the client sent (with its port, if any).
    pub host: HeaderValue,
}

impl Origin {
    /// The origin an authenticated hop carries in its forwarding headers (`fallback` where one is
    /// missing or malformed).
    pub fn from_hop(headers: &HeaderMap, fallback: Origin) -> Origin {
        let client = headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
            .unwrap_or(fallback.client);
        let https = match headers.get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
            Some(b"https") => true,
            Some(b"http") => false,
            _ => fallback.https,
        };
        let host = headers
            .get(&X_FORWARDED_HOST)
            .cloned()
            .unwrap_or(fallback.host);
        Origin {
            client,
            https,
            host,
        }
    }
}

/// Replaces every forwarding header (and the hop header) with `origin`'s.
pub(super) fn set_forwarded(headers: &mut HeaderMap, origin: &Origin) {
    headers.remove(HOP_HEADER);
    headers.remove(header::FORWARDED);
    let ip = origin.client.to_string();
    let proto = if origin.https { "https" } else { "http" };
    if let Ok(v) = HeaderValue::from_str(&ip) {
        headers.insert(X_FORWARDED_FOR, v.clone());
        headers.insert(X_REAL_IP, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    headers.insert(X_FORWARDED_HOST, origin.host.clone());
    let for_ = match origin.client {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let mut forwarded = format!("for={for_};proto={proto}");
    if let Ok(host) = origin.host.to_str() {
        // A token as is; anything else (a port's colon) as a quoted string. Host values hold no quote or
        // backslash (hyper refuses them in a Host header), but escape them anyway.
        let token = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if token {
            forwarded.push_str(";host=");
            forwarded.push_str(host);
        } else {
            let quoted = host.replace('\\', "\\\\").replace('"', "\\\"");
            forwarded.push_str(&format!(";host=\"{quoted}\""));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_are_replaced_not_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("cairn-hop", HeaderValue::from_static("guess"));
        let origin = Origin {
            client: "203.0.113.9".parse().unwrap(),
            https: false,
            host: HeaderValue::from_static("shop.example.com:8000"),
        };
        set_forwarded(&mut h, &origin);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example.com:8000");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=http;host=\"shop.example.com:8000\""
        );
        assert!(!h.contains_key("cairn-hop"));

        let v6 = Origin {
            client: "2001:db8::1".parse().unwrap(),
            https: true,
            host: HeaderValue::from_static("shop.example.com"),
        };
        set_forwarded(&mut h, &v6);
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=shop.example.com"
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn an_upgrade_keeps_its_headers_and_nothing_else_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade, x-secret"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-secret") && !h.contains_key("te"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }
}
