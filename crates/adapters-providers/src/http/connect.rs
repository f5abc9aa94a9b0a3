//! Opening the connections of [`super::HttpClient`]: TCP with keepalive, the proxies
//! of the environment, TLS with HTTP/2 by ALPN, all within the connect timeout.
//!
//! Proxies (`http://` or `https://`, the latter reached over TLS): an `https`
//! destination through a `CONNECT` tunnel, a plain `http` one by sending the request
//! in absolute form to the proxy; a proxy URL's user and password become
//! `Proxy-Authorization`.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::USER_AGENT;
use http::uri::Scheme;
use http::{HeaderMap, HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::HttpSettings;
use super::client::USER_AGENT_VALUE;

/// What the client's pool connects with.
pub(crate) type Connector = Timed<HttpsConnector<ProxyConnector>>;

type BoxError = Box<dyn StdError + Send + Sync>;
type Connecting<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// Idle time before the first TCP keepalive probe, and between probes: a pooled
/// connection whose peer vanished is found dead instead of stalling the next request.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged data older than this closes the connection (Linux).
#[cfg(target_os = "linux")]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The connector of a client: TLS (HTTP/2 offered) over [`ProxyConnector`], bounded
/// by `settings.connect_timeout` from the name lookup to the end of the handshake.
pub(crate) fn connector(
    settings: &HttpSettings,
    tls: rustls::ClientConfig,
    proxies: Arc<Matcher>,
) -> Connector {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(settings.connect_timeout));
    tcp.set_keepalive(Some(TCP_KEEPALIVE));
    tcp.set_keepalive_interval(Some(TCP_KEEPALIVE));
    tcp.set_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
    #[cfg(target_os = "linux")]
    tcp.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    // The TLS layer passes `https` destinations through.
    tcp.enforce_http(false);
    let to_proxy = HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp.clone());
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(ProxyConnector {
            tcp,
            to_proxy,
            proxies,
        });
    Timed {
        inner: https,
        timeout: settings.connect_timeout,
    }
}

/// Bounds a connector's whole connect (lookup, TCP, proxy tunnel, TLS handshake).
#[derive(Clone, Debug)]
pub(crate) struct Timed<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Service<Uri> for Timed<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Connecting<C::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_elapsed) => Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {} ms", timeout.as_millis()),
                )) as BoxError),
            }
        })
    }
}

/// Opens the connection to a destination, or to the proxy that serves it.
#[derive(Clone, Debug)]
pub(crate) struct ProxyConnector {
    tcp: HttpConnector,
    /// To a proxy: TLS for an `https://` proxy (HTTP/1.1 only), else plain TCP.
    to_proxy: HttpsConnector<HttpConnector>,
    proxies: Arc<Matcher>,
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxyAware;
    type Error = BoxError;
    type Future = Connecting<ProxyAware>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let Some(proxy) = self.proxies.intercept(&dst) else {
            let mut tcp = self.tcp.clone();
            return Box::pin(async move {
                let io = MaybeHttpsStream::Http(tcp.call(dst).await?);
                Ok(ProxyAware { io, proxied: false })
            });
        };
        let proxy_uri = proxy.uri().clone();
        if !matches!(proxy_uri.scheme_str(), Some("http" | "https")) {
            let scheme = proxy_uri.scheme_str().unwrap_or("none").to_owned();
            return Box::pin(async move {
                Err(format!("proxy scheme {scheme} is not supported (use http or https)").into())
            });
        }
        let mut to_proxy = self.to_proxy.clone();
        if dst.scheme() == Some(&Scheme::HTTPS) {
            let mut headers = HeaderMap::new();
            headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
            let mut tunnel = Tunnel::new(proxy_uri, to_proxy).with_headers(headers);
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            Box::pin(async move {
                let io = tunnel.call(dst).await?;
                Ok(ProxyAware { io, proxied: false })
            })
        } else {
            Box::pin(async move {
                let io = to_proxy.call(proxy_uri).await?;
                Ok(ProxyAware { io, proxied: true })
            })
        }
    }
}

/// A connection that knows whether it leads to a proxy that takes requests in
/// absolute form (plain-HTTP destinations through a proxy).
#[derive(Debug)]
pub(crate) struct ProxyAware {
    io: MaybeHttpsStream<TokioIo<TcpStream>>,
    proxied: bool,
}

impl Connection for ProxyAware {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl Read for ProxyAware {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for ProxyAware {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use socket2::SockRef;
    use tokio::net::TcpListener;

    use super::*;

    /// The options of a direct connection's socket, read back from the kernel.
    #[tokio::test]
    async fn a_direct_connection_has_nodelay_keepalive_and_a_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut connector = connector(
            &HttpSettings::default(),
            tls,
            Arc::new(Matcher::builder().build()),
        );
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .unwrap();
        let uri: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
        let connection = connector.call(uri).await.unwrap();
        let MaybeHttpsStream::Http(ProxyAware {
            io: MaybeHttpsStream::Http(io),
            proxied: false,
        }) = &connection
        else {
            panic!("not a direct plain connection");
        };
        let socket = SockRef::from(io.inner());
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), TCP_KEEPALIVE);
        assert_eq!(
            socket.tcp_keepalive_retries().unwrap(),
            TCP_KEEPALIVE_RETRIES
        );
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(TCP_USER_TIMEOUT));
    }
}
