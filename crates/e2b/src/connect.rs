//! The Connect protocol (connectrpc.com/docs/protocol) as envd's clients speak it, on axum:
//! unary calls (`application/json` or `application/proto`) and server-streaming calls
//! (`application/connect+json` or `application/connect+proto`, length-prefixed envelopes
//! over one HTTP/1.1 or HTTP/2 response, ended by an end-of-stream envelope that carries the
//! error, if any). Compression is not offered (the SDKs turn it off).
//!
//! No maintained Rust crate serves Connect on axum for both codecs at the versions we use,
//! and the wire format is small, so it is written here (docs/e2b.md records the choice).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A message both codecs can carry.
pub trait Msg: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static {}
impl<T: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static> Msg for T {}

/// How messages are encoded on one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    fn unary_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        }
    }
    fn stream_type(self) -> &'static str {
        match self {
            Codec::Json => "application/connect+json",
            Codec::Proto => "application/connect+proto",
        }
    }
    fn encode<M: Msg>(self, m: &M) -> Bytes {
        match self {
            Codec::Json => Bytes::from(serde_json::to_vec(m).unwrap_or_else(|_| b"{}".to_vec())),
            Codec::Proto => Bytes::from(m.encode_to_vec()),
        }
    }
    fn decode<M: Msg>(self, data: &[u8]) -> Result<M, RpcError> {
        match self {
            // An empty unary JSON body is the empty message.
            Codec::Json if data.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => serde_json::from_slice(data)
                .map_err(|e| RpcError::invalid(format!("the request is not a valid message: {e}"))),
            Codec::Proto => {
                M::decode(data).map_err(|e| RpcError::invalid(format!("the request is not a valid message: {e}")))
            }
        }
    }
}

/// Connect error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error (the Connect protocol's table).
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A failed call: its code and a message for the user.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        RpcError::new(Code::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        RpcError::new(Code::NotFound, message)
    }
    pub fn unimplemented(message: impl Into<String>) -> Self {
        RpcError::new(Code::Unimplemented, message)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}

impl From<conductor_service::ServiceError> for RpcError {
    fn from(e: conductor_service::ServiceError) -> Self {
        use conductor_service::ServiceError as E;
        let code = match &e {
            E::Invalid { .. } | E::Config(_) => Code::InvalidArgument,
            E::NotFound { .. } => Code::NotFound,
            E::Conflict(_) => Code::FailedPrecondition,
            E::Exhausted(_) | E::TooLarge(_) | E::NoSpace(_) => Code::ResourceExhausted,
            E::WorkspaceExited(_) => Code::Unavailable,
            E::Environment { .. } => Code::FailedPrecondition,
            E::Engine(_) | E::Store(_) | E::Host { .. } => Code::Internal,
        };
        let message = match &e {
            E::NotFound { what } => format!("{what} was not found"),
            other => other.to_string(),
        };
        RpcError::new(code, message)
    }
}

/// The `Connect-Timeout-Ms` of a call.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn refuse_compression(headers: &HeaderMap, name: &str) -> Result<(), RpcError> {
    match headers.get(name).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => Ok(()),
        Some(other) => Err(RpcError::unimplemented(format!(
            "compression '{other}' is not supported; send uncompressed messages"
        ))),
    }
}

/// The codec a call's content type names, for a unary call (`streaming` false) or a
/// server-streaming one; anything else is refused with the two the call may use.
fn codec_of(headers: &HeaderMap, streaming: bool) -> Result<Codec, (Codec, RpcError)> {
    let (json, proto) = if streaming {
        (Codec::Json.stream_type(), Codec::Proto.stream_type())
    } else {
        (Codec::Json.unary_type(), Codec::Proto.unary_type())
    };
    match content_type(headers).as_str() {
        t if t == json => Ok(Codec::Json),
        t if t == proto => Ok(Codec::Proto),
        other => Err((
            Codec::Json,
            RpcError::unimplemented(format!(
                "content type '{other}' is not served here; use {json} or {proto}"
            )),
        )),
    }
}

/// Decodes the request of a unary call: its codec and message.
pub fn unary_request<M: Msg>(headers: &HeaderMap, body: &[u8]) -> Result<(Codec, M), (Codec, RpcError)> {
    let codec = codec_of(headers, false)?;
    refuse_compression(headers, "content-encoding").map_err(|e| (codec, e))?;
    codec.decode(body).map(|m| (codec, m)).map_err(|e| (codec, e))
}

/// The response of a unary call.
pub fn unary_response<M: Msg>(codec: Codec, result: Result<M, RpcError>) -> Response {
    match result {
        Ok(m) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static(codec.unary_type()))],
            codec.encode(&m),
        )
            .into_response(),
        Err(e) => error_response(&e),
    }
}

/// A unary error: its HTTP status with a JSON body.
pub fn error_response(e: &RpcError) -> Response {
    (
        e.code.http_status(),
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        e.json().to_string(),
    )
        .into_response()
}

const END_STREAM: u8 = 0x02;

fn envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + data.len());
    b.put_u8(flags);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// Decodes the request of a server-streaming call (one enveloped message).
pub fn stream_request<M: Msg>(headers: &HeaderMap, body: &[u8]) -> Result<(Codec, M), (Codec, RpcError)> {
    let codec = codec_of(headers, true)?;
    refuse_compression(headers, "connect-content-encoding").map_err(|e| (codec, e))?;
    if body.len() < 5 {
        return Err((codec, RpcError::invalid("the request holds no enveloped message")));
    }
    if body[0] & 0x01 != 0 {
        return Err((codec, RpcError::unimplemented("compressed messages are not supported")));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let Some(data) = body.get(5..5 + len) else {
        return Err((codec, RpcError::invalid("the request's envelope is cut short")));
    };
    codec.decode(data).map(|m| (codec, m)).map_err(|e| (codec, e))
}

/// The response of a server-streaming call: every message of `messages`, then the end of
/// the stream (with the error that ended it, if one did).
pub fn stream_response<M, S>(codec: Codec, messages: S) -> Response
where
    M: Msg,
    S: Stream<Item = Result<M, RpcError>> + Send + 'static,
{
    let body = async_stream_body(codec, messages);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(codec.stream_type()))],
        Body::from_stream(body),
    )
        .into_response()
}

/// A streaming call that fails before its first message.
pub fn stream_error(codec: Codec, e: RpcError) -> Response {
    stream_response::<crate::pb::process::ListRequest, _>(codec, futures_util::stream::iter([Err(e)]))
}

fn async_stream_body<M, S>(
    codec: Codec,
    messages: S,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send
where
    M: Msg,
    S: Stream<Item = Result<M, RpcError>> + Send + 'static,
{
    let messages = Box::pin(messages);
    futures_util::stream::unfold((messages, false), move |(mut messages, done)| async move {
        if done {
            return None;
        }
        match messages.next().await {
            Some(Ok(m)) => Some((Ok(envelope(0, &codec.encode(&m))), (messages, false))),
            Some(Err(e)) => {
                let end = serde_json::json!({ "error": e.json() }).to_string();
                Some((Ok(envelope(END_STREAM, end.as_bytes())), (messages, true)))
            }
            None => Some((Ok(envelope(END_STREAM, b"{}")), (messages, true))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_frame_messages_and_the_end() {
        let e = envelope(0, b"abc");
        assert_eq!(&e[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/connect+json"),
        );
        let body = envelope(0, br#"{"path":"/workspace"}"#);
        let (codec, m): (Codec, crate::pb::filesystem::WatchDirRequest) = stream_request(&h, &body).unwrap();
        assert_eq!(codec, Codec::Json);
        assert_eq!(m.path, "/workspace");
        let (_, e) = stream_request::<crate::pb::filesystem::WatchDirRequest>(&h, &body[..4]).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
    }

    #[test]
    fn unary_calls_take_either_codec_and_ignore_unknown_fields() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let (_, m): (Codec, crate::pb::filesystem::ListDirRequest) =
            unary_request(&h, br#"{"path":"a","depth":2,"future":1}"#).unwrap();
        assert_eq!((m.path.as_str(), m.depth), ("a", 2));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/proto"));
        let bytes = prost::Message::encode_to_vec(&m);
        let (codec, back): (Codec, crate::pb::filesystem::ListDirRequest) = unary_request(&h, &bytes).unwrap();
        assert_eq!((codec, back), (Codec::Proto, m));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let (_, e) = unary_request::<crate::pb::filesystem::ListDirRequest>(&h, b"").unwrap_err();
        assert_eq!(e.code, Code::Unimplemented);
        assert_eq!(Code::NotFound.http_status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn json_bytes_and_enums_follow_the_proto3_mapping() {
        use crate::pb::process::{process_event, ProcessEvent};
        let ev = ProcessEvent {
            event: Some(process_event::Event::Data(process_event::DataEvent {
                output: Some(process_event::data_event::Output::Stdout(b"hi\n".to_vec())),
            })),
        };
        let json = serde_json::to_string(&ev).unwrap();
        assert_eq!(json, r#"{"data":{"stdout":"aGkK"}}"#);
        let sig: crate::pb::process::SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":7},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(sig.signal(), crate::pb::process::Signal::Sigkill);
    }
}
