//! The metrics endpoint: `GET /metrics` over HTTP/1.1 (hyper), for
//! Prometheus scrapes. Anything else gets a 404.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::sync::Arc;
//!
//! let stop = tokio_util::sync::CancellationToken::new();
//! let render = Arc::new(|| "# EOF\n".to_string());
//! let (addr, _task) = shoal_net::http::serve_metrics("127.0.0.1:0", render, stop).await?;
//! println!("curl http://{addr}/metrics");
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Renders the metrics text, once per scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A connection is closed after this long, whatever it is doing.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);

/// Binds `addr` and serves `GET /metrics` with what `render` returns until
/// `stop`. Returns the bound address (`addr` may have port 0).
pub async fn serve_metrics(
    addr: &str,
    render: Render,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let render = render.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let render = render.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &render)) }
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                    Ok(Err(e)) => debug!("metrics connection: {e}"),
                    Err(_) => debug!("metrics connection closed after {CONNECTION_LIMIT:?}"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    Ok((local, task))
}

fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if req.uri().path() != "/metrics" {
        (StatusCode::NOT_FOUND, "text/plain", "only /metrics is served here\n".to_string())
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".to_string())
    } else {
        (StatusCode::OK, OPENMETRICS, render())
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
