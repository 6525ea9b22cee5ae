//! The HTTP client of a checked fetch: gix's smart-HTTP transport over a reqwest client whose DNS for
//! the remote's host is pinned to the addresses [`super::Sources`] checked, so nothing resolves the
//! name again between the check and the connection (no DNS-rebinding window). It follows no
//! redirect, uses no proxy, and (for a manifest's URL) speaks only https.
//!
//! gix calls [`Http::post`], writes the request body, then reads the headers and the body: the request
//! is sent on the first read, with the body written so far (git's requests are small and bounded).
//!
//! What it must not do: connect anywhere but the pinned addresses, or show a credential of the URL.

use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::http::{
    GetResponse, Http, PostBodyDataKind, PostResponse,
};

/// A gix HTTP implementation that connects `host` only to `addrs`.
pub(crate) struct PinnedHttp {
    client: reqwest::blocking::Client,
}

impl PinnedHttp {
    pub(crate) fn new(
        host: &str,
        addrs: &[SocketAddr],
        https_only: bool,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::blocking::Client::builder()
            .resolve_to_addrs(host, addrs)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(https_only)
            .connect_timeout(Duration::from_secs(20))
            .user_agent(concat!("cairn-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(PinnedHttp { client })
    }

    fn exchange(
        &self,
        url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
        post: bool,
    ) -> (Headers, Body, PostBody) {
        let mut map = reqwest::header::HeaderMap::new();
        for line in headers {
            let Some((k, v)) = line.as_ref().split_once(':') else {
                continue;
            };
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                reqwest::header::HeaderValue::from_str(v.trim()),
            ) {
                map.insert(k, v);
            }
        }
        let req = if post {
            self.client.post(url)
        } else {
            self.client.get(url)
        }
        .headers(map);
        let shared = Arc::new(Mutex::new(Shared {
            req: Some(req),
            post,
            posted: Vec::new(),
            headers: None,
            body: None,
            error: None,
        }));
        (
            Headers {
                shared: shared.clone(),
                own: None,
            },
            Body {
                shared: shared.clone(),
                own: None,
            },
            PostBody { shared },
        )
    }
}

struct Shared {
    req: Option<reqwest::blocking::RequestBuilder>,
    post: bool,
    posted: Vec<u8>,
    headers: Option<Vec<u8>>,
    body: Option<reqwest::blocking::Response>,
    error: Option<(io::ErrorKind, String)>,
}

impl Shared {
    /// Sends the request once; afterwards its headers and body wait to be taken.
    fn perform(&mut self) -> io::Result<()> {
        if let Some(req) = self.req.take() {
            let req = if self.post {
                req.body(std::mem::take(&mut self.posted))
            } else {
                req
            };
            match req.send() {
                Ok(res) if res.status().is_success() => {
                    let mut text = Vec::new();
                    for (k, v) in res.headers() {
                        text.extend_from_slice(k.as_str().as_bytes());
                        text.push(b':');
                        text.extend_from_slice(v.as_bytes());
                        text.push(b'\n');
                    }
                    self.headers = Some(text);
                    self.body = Some(res);
                }
                Ok(res) => {
                    let status = res.status();
                    let kind = if status == reqwest::StatusCode::UNAUTHORIZED {
                        io::ErrorKind::PermissionDenied
                    } else {
                        io::ErrorKind::Other
                    };
                    // A redirect is not followed: the new location was never checked.
                    self.error = Some((kind, format!("Received HTTP status {}", status.as_str())));
                }
                Err(e) => {
                    let e = e.without_url();
                    let why = cairn_schema::error::chain(&e);
                    self.error = Some((io::ErrorKind::Other, why));
                }
            }
        }
        match &self.error {
            Some((kind, why)) => Err(io::Error::new(*kind, why.clone())),
            None => Ok(()),
        }
    }
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The response's headers, one `name:value` line each (what gix's transports produce).
pub(crate) struct Headers {
    shared: Arc<Mutex<Shared>>,
    own: Option<Cursor<Vec<u8>>>,
}

impl Headers {
    fn ready(&mut self) -> io::Result<&mut Cursor<Vec<u8>>> {
        if self.own.is_none() {
            let mut s = lock(&self.shared);
            s.perform()?;
            self.own = Some(Cursor::new(s.headers.take().unwrap_or_default()));
        }
        Ok(self.own.as_mut().expect("set above"))
    }
}

impl Read for Headers {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.ready()?.read(buf)
    }
}

impl BufRead for Headers {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.ready()?.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        if let Some(c) = &mut self.own {
            c.consume(n);
        }
    }
}

/// The response's body, streamed.
pub(crate) struct Body {
    shared: Arc<Mutex<Shared>>,
    own: Option<BufReader<reqwest::blocking::Response>>,
}

impl Body {
    fn ready(&mut self) -> io::Result<&mut BufReader<reqwest::blocking::Response>> {
        if self.own.is_none() {
            let mut s = lock(&self.shared);
            s.perform()?;
            let body = s
                .body
                .take()
                .ok_or_else(|| io::Error::other("the response body was taken already"))?;
            self.own = Some(BufReader::with_capacity(64 * 1024, body));
        }
        Ok(self.own.as_mut().expect("set above"))
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.ready()?.read(buf)
    }
}

impl BufRead for Body {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.ready()?.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        if let Some(b) = &mut self.own {
            b.consume(n);
        }
    }
}

/// What gix writes as the request body, kept until the request is sent.
pub(crate) struct PostBody {
    shared: Arc<Mutex<Shared>>,
}

impl Write for PostBody {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = lock(&self.shared);
        if s.req.is_none() {
            return Err(io::Error::other("the request was sent already"));
        }
        s.posted.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Http for PinnedHttp {
    type Headers = Headers;
    type ResponseBody = Body;
    type PostBody = PostBody;

    fn get(
        &mut self,
        url: &str,
        _base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> gix::Result<GetResponse<Headers, Body>> {
        let (headers, body, _) = self.exchange(url, headers, false);
        Ok(GetResponse { headers, body })
    }

    fn post(
        &mut self,
        url: &str,
        _base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
        _body: PostBodyDataKind,
    ) -> gix::Result<PostResponse<Headers, Body, PostBody>> {
        let (headers, body, post_body) = self.exchange(url, headers, true);
        Ok(PostResponse {
            post_body,
            headers,
            body,
        })
    }

    fn configure(&mut self, _config: &dyn std::any::Any) -> gix::Result {
        // Nothing gix's config could change here is wanted: no redirects, no proxy, no other host.
        Ok(())
    }
}
