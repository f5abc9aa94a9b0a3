//! Server-sent events over a response body, with an idle timeout between events, the
//! total timeout over the stream, and detection of a body that ends in the middle of
//! an event.
//!
//! Parsing is `eventsource-stream`'s; this module adds what it leaves out: it drops a
//! partial event at the end of the body silently, so the raw bytes are watched and a
//! body whose last event is not terminated by a blank line yields an error instead.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use apikeyrouter_application::ports::ProviderError;
use apikeyrouter_domain::FailureKind;
use eventsource_stream::{EventStreamError, Eventsource};
use futures_core::Stream;
use futures_util::StreamExt;
use http_body_util::BodyDataStream;

use super::client::{BodyLimits, Response, error_text, transport_error};

/// One server-sent event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `None` when absent or `message` (the SSE default).
    pub event: Option<String>,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// The events of `response`'s body. Between two events at most the response's idle
/// timeout passes (the `first_byte_timeout` when the response came from
/// [`super::HttpClient::send`]), and the whole stream ends within the total timeout,
/// else the stream yields a [`FailureKind::Timeout`] error. A failed
/// read, invalid UTF-8, or a body ending inside an event yields a
/// [`FailureKind::Network`] error (`truncated or malformed event stream: ...`). The
/// stream ends after its first error. Dropping it closes the connection.
pub fn sse_stream(
    response: Response,
) -> impl Stream<Item = Result<SseEvent, ProviderError>> + Send + 'static {
    let limits = BodyLimits::of(&response);
    let status = response.status().as_u16();
    let body = WatchedBody {
        inner: Box::pin(BodyDataStream::new(response.into_body())),
        tail: Vec::with_capacity(4),
        finished: false,
    };
    let events = Box::pin(body.eventsource());
    futures_util::stream::unfold(Some(events), move |state| async move {
        let mut events = state?;
        match limits.within(events.next()).await {
            Err(cut) => Some((Err(cut.error("event stream").with_status(status)), None)),
            Ok(None) => None,
            Ok(Some(Ok(event))) => {
                let name =
                    (!event.event.is_empty() && event.event != "message").then_some(event.event);
                Some((
                    Ok(SseEvent {
                        event: name,
                        data: event.data,
                    }),
                    Some(events),
                ))
            }
            Ok(Some(Err(err))) => Some((Err(stream_error(err).with_status(status)), None)),
        }
    })
}

fn stream_error(err: EventStreamError<BodyFault>) -> ProviderError {
    // A read that timed out (hyper's timer or the socket's) is a timeout, as for bodies.
    let kind = match &err {
        EventStreamError::Transport(BodyFault::Transport(inner)) => transport_error(inner).kind,
        _ => FailureKind::Network,
    };
    let detail = match err {
        EventStreamError::Transport(fault) => fault.to_string(),
        EventStreamError::Utf8(err) => format!("invalid utf-8: {err}"),
        EventStreamError::Parser(err) => format!("unparsable event: {err}"),
    };
    let detail: String = detail.chars().take(200).collect();
    ProviderError::new(
        kind,
        format!("truncated or malformed event stream: {detail}"),
    )
}

/// Why the body of an event stream failed.
#[derive(Debug)]
enum BodyFault {
    /// Reading failed (reset, timeout).
    Transport(hyper::Error),
    /// The body ended without the blank line that terminates an event.
    EndedMidEvent,
}

impl fmt::Display for BodyFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(err) => f.write_str(&error_text(err)),
            Self::EndedMidEvent => f.write_str("the body ended inside an event"),
        }
    }
}

/// A response body that remembers its last four bytes, to tell at its end whether the
/// last event was terminated.
struct WatchedBody<S> {
    inner: Pin<Box<S>>,
    tail: Vec<u8>,
    finished: bool,
}

impl<S, B> Stream for WatchedBody<S>
where
    S: Stream<Item = Result<B, hyper::Error>>,
    B: AsRef<[u8]>,
{
    type Item = Result<B, BodyFault>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // `WatchedBody` is `Unpin`: its only pinned part is boxed.
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => {
                let bytes_ref = bytes.as_ref();
                this.tail.extend_from_slice(bytes_ref);
                let excess = this.tail.len().saturating_sub(4);
                this.tail.drain(..excess);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.finished = true;
                Poll::Ready(Some(Err(BodyFault::Transport(err))))
            }
            Poll::Ready(None) => {
                this.finished = true;
                let terminated = this.tail.is_empty()
                    || this.tail.ends_with(b"\n\n")
                    || this.tail.ends_with(b"\r\r")
                    || this.tail.ends_with(b"\r\n\r\n");
                if terminated {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(BodyFault::EndedMidEvent)))
                }
            }
        }
    }
}
