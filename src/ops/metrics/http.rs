//! The metrics endpoint: a minimal HTTP/1.1 server for `GET /metrics` (Prometheus text) and
//! `GET /status.json` (the [`super::state::Snapshot`] as JSON, what `ntp-dtls status` reads),
//! and the client side of `ntp-dtls status`.

use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head we read; a scraper's is a few hundred bytes.
pub const MAX_REQUEST_LEN: usize = 8192;
/// Time a client has to send its request and read the answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 32;
/// The paths served, for the 404 text.
pub const PATHS: &str = "/metrics, /status.json";

/// What answers a path: a page, or None for a 404.
type Pages = dyn Fn(&str) -> Option<Page>;

/// One answer of the endpoint.
pub struct Page {
    pub content_type: &'static str,
    pub body: String,
}

/// Serves `GET PATH` on `listener` until `shutdown` resolves: 200 with `pages(PATH)` when it
/// returns a page, 404 for any other path or method, 400 for a malformed request, 431 for a
/// request head over [`MAX_REQUEST_LEN`]. One task per connection, each bounded by
/// [`CONNECTION_TIMEOUT`]; `Connection: close`, no keep-alive.
///
/// Must run inside a [`tokio::task::LocalSet`] (connection tasks are `spawn_local`ed), so
/// `pages` need not be `Send`. It is called once per request, on the relay's thread: keep it
/// cheap.
pub async fn serve(
    listener: TcpListener,
    pages: impl Fn(&str) -> Option<Page> + 'static,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_timeout(listener, pages, shutdown, CONNECTION_TIMEOUT).await
}

async fn serve_with_timeout(
    listener: TcpListener,
    pages: impl Fn(&str) -> Option<Page> + 'static,
    shutdown: impl Future<Output = ()>,
    connection_timeout: Duration,
) {
    let pages: Rc<Pages> = Rc::new(pages);
    let active = Rc::new(std::cell::Cell::new(0usize));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.get() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        active.set(active.get() + 1);
        let pages = pages.clone();
        let active = active.clone();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(connection_timeout, handle(stream, &*pages)).await;
            active.set(active.get() - 1);
        });
    }
}

async fn handle(mut stream: TcpStream, pages: &Pages) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_complete = loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if buf.len() > MAX_REQUEST_LEN {
            break false;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // Closed before a full head: answer what we can if the request line is there.
            break buf.contains(&b'\n');
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let response = if !head_complete {
        response(
            431,
            "Request Header Fields Too Large",
            "request too large\n",
        )
    } else {
        let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(method), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
                let path = target.split('?').next().unwrap_or(target);
                match (method, pages(path)) {
                    ("GET", Some(page)) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{}",
                        page.content_type,
                        page.body.len(),
                        page.body
                    ),
                    _ => response(404, "Not Found", &format!("not found: try GET {PATHS}\n")),
                }
            }
            _ => response(400, "Bad Request", "bad request\n"),
        }
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    // Read what the client may still send (the rest of an oversized request) until it closes:
    // closing with unread data would reset the connection and could discard our answer.
    let mut drained = 0;
    while drained < 64 * 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

fn response(code: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Why a fetch from a relay's endpoint failed. `status` adds the hint each one deserves.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nothing listens there: no relay, or one started without --metrics.
    #[error("{addr}: {source}")]
    Refused {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: no answer within {timeout:?}")]
    TimedOut { addr: String, timeout: Duration },
    /// Something answered, but not as a relay's endpoint would.
    #[error("{addr}: {status}")]
    Status { addr: String, status: String },
    #[error("{addr}: malformed HTTP response")]
    Malformed { addr: String },
}

/// `GET path` from `addr` ("host:port"); the body of a 200 answer.
pub async fn fetch(addr: &str, path: &str, timeout: Duration) -> Result<String, FetchError> {
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::ConnectionRefused {
            FetchError::Refused {
                addr: addr.to_string(),
                source,
            }
        } else {
            FetchError::Io {
                addr: addr.to_string(),
                source,
            }
        }
    };
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(16 * 1024 * 1024)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or(FetchError::Malformed {
            addr: addr.to_string(),
        })?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(FetchError::Status {
                addr: addr.to_string(),
                status: status.to_string(),
            });
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| FetchError::TimedOut {
            addr: addr.to_string(),
            timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `request` raw and returns the whole response.
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8(response).expect("utf-8")
    }

    fn pages(path: &str) -> Option<Page> {
        match path {
            "/metrics" => Some(Page {
                content_type: super::super::exposition::CONTENT_TYPE,
                body: "ntp_dtls_x_total 1\n".into(),
            }),
            "/status.json" => Some(Page {
                content_type: "application/json",
                body: "{}".into(),
            }),
            _ => None,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_both_paths_and_404_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Not Send: the point of running in a LocalSet.
        let requests = Rc::new(std::cell::Cell::new(0u32));
        let seen = requests.clone();
        let counted = move |path: &str| {
            seen.set(seen.get() + 1);
            pages(path)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let local = tokio::task::LocalSet::new();
        let server = local.spawn_local(serve(listener, counted, async {
            let _ = stopped.await;
        }));
        local
            .run_until(async {
                let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let (head, body) = ok.split_once("\r\n\r\n").expect("head");
                assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
                assert!(
                    head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
                    "{head}"
                );
                assert!(head.contains(&format!("Content-Length: {}", body.len())));
                assert_eq!(body, "ntp_dtls_x_total 1\n");

                let json = exchange(addr, b"GET /status.json HTTP/1.0\r\n\r\n").await;
                assert!(json.contains("Content-Type: application/json"), "{json}");
                let query = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
                assert!(query.starts_with("HTTP/1.1 200 OK"), "{query}");

                for request in [
                    &b"GET / HTTP/1.1\r\n\r\n"[..],
                    b"GET /metricsx HTTP/1.1\r\n\r\n",
                    b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                ] {
                    let answer = exchange(addr, request).await;
                    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
                    assert!(answer.contains("/status.json"), "{answer}");
                }
                let bad = exchange(addr, b"hello\r\n\r\n").await;
                assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");

                let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
                huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_LEN + 10));
                let too_big = exchange(addr, &huge).await;
                assert!(too_big.starts_with("HTTP/1.1 431 "), "{too_big}");

                let body = fetch(&addr.to_string(), "/status.json", Duration::from_secs(5))
                    .await
                    .expect("fetch");
                assert_eq!(body, "{}");
                let missing = fetch(&addr.to_string(), "/nothing", Duration::from_secs(5)).await;
                assert!(
                    matches!(&missing, Err(FetchError::Status { status, .. }) if status.contains("404")),
                    "{missing:?}"
                );
                // Every request but the 400 and 431 ones asked for a page.
                assert_eq!(requests.get(), 8);
            })
            .await;
        let _ = stop.send(());
        local.await;
        assert!(server.is_finished());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_port_is_a_refusal() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let err = fetch(
            &format!("127.0.0.1:{port}"),
            "/status.json",
            Duration::from_secs(5),
        )
        .await
        .expect_err("nothing listens");
        assert!(matches!(err, FetchError::Refused { .. }), "{err:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_client_is_cut_off_by_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let timeout = Duration::from_millis(200);
        let local = tokio::task::LocalSet::new();
        local.spawn_local(serve_with_timeout(
            listener,
            pages,
            std::future::pending(),
            timeout,
        ));
        local
            .run_until(async {
                let started = std::time::Instant::now();
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                // Half a request line, then silence: the server must hang up on its own.
                stream.write_all(b"GET /met").await.expect("write");
                let mut buf = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
                        .await
                        .expect("the server closed the connection");
                assert!(read.is_ok() && buf.is_empty(), "{read:?} {buf:?}");
                assert!(started.elapsed() >= timeout);
            })
            .await;
    }
}
