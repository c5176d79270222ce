//! One OTLP export over gRPC, framed here rather than by tonic's client: tonic compresses at
//! gzip level 6 and has no setting for it, and at level 6 compression is most of the sink's
//! CPU. The message goes at level 1 like the HTTP path's, in the one length-prefixed frame a
//! unary call carries (`grpc-encoding: gzip`, the compressed flag set), over the same tonic
//! channel (HTTP/2, TLS, the endpoint's origin). The answer's status comes from the trailers,
//! or from the headers of a trailers-only answer, as tonic's own client reads it.

use std::io::Read;
use std::time::Duration;

use http_body_util::BodyExt;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::packed::Chunks;

/// The largest answer read (an `Export*ServiceResponse` is a few bytes to a few KiB).
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Bytes before a message in its frame: the compressed flag and the big-endian length.
pub const FRAME_HEADER: usize = 5;

/// Fills in the frame `header` of a unary call's message of `len` bytes (gzip-compressed
/// when `gzip`).
pub fn frame_header(header: &mut [u8], len: usize, gzip: bool) {
    header[0] = u8::from(gzip);
    header[1..FRAME_HEADER].copy_from_slice(&(len as u32).to_be_bytes());
}

/// `message` (already gzip-compressed when `gzip`) in its frame.
#[cfg(test)]
pub fn frame(message: &[u8], gzip: bool) -> Vec<u8> {
    let mut out = vec![0; FRAME_HEADER];
    frame_header(&mut out, message.len(), gzip);
    out.extend_from_slice(message);
    out
}

/// Calls `path` with the framed `body` within `timeout`; returns the answer message's bytes.
pub async fn unary(
    channel: &Channel,
    metadata: &MetadataMap,
    path: &'static str,
    body: &Chunks,
    gzip: bool,
    timeout: Duration,
) -> Result<Vec<u8>, Status> {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .body(tonic::body::Body::new(body.http_body()))
        .map_err(|e| Status::internal(format!("request: {e}")))?;
    let headers = request.headers_mut();
    // The configured headers first, then what gRPC requires over them (the same header map
    // serves OTLP/HTTP, where a Content-Type of its own is harmless).
    headers.extend(metadata.clone().into_headers());
    for reserved in ["grpc-encoding", "grpc-accept-encoding", "grpc-timeout"] {
        headers.remove(reserved);
    }
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    if let Ok(value) = http::HeaderValue::from_str(&format!("{}m", timeout.as_millis().max(1))) {
        headers.insert("grpc-timeout", value);
    }
    if gzip {
        headers.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
    }
    match tokio::time::timeout(timeout, call(channel, request)).await {
        Ok(answer) => answer,
        Err(_) => Err(Status::deadline_exceeded(format!("no whole answer within {timeout:?}"))),
    }
}

async fn call(channel: &Channel, request: http::Request<tonic::body::Body>) -> Result<Vec<u8>, Status> {
    let unavailable = |e: &dyn std::fmt::Display| Status::unavailable(e.to_string());
    let answer = channel.clone().oneshot(request).await.map_err(|e| unavailable(&e))?;
    let (parts, body) = answer.into_parts();
    match parts.status {
        http::StatusCode::OK => {}
        // A proxy refusing the size: split like a receiver's RESOURCE_EXHAUSTED.
        http::StatusCode::PAYLOAD_TOO_LARGE => return Err(Status::resource_exhausted("HTTP 413 from a proxy")),
        status => return Err(Status::unavailable(format!("HTTP {status} instead of a gRPC answer"))),
    }
    // A trailers-only answer: the status is in the headers, and there is no message.
    if let Some(status) = status_of(&parts.headers) {
        if status.code() != Code::Ok {
            return Err(status);
        }
    }
    let collected = http_body_util::Limited::new(body, MAX_ANSWER + 5).collect().await.map_err(|e| unavailable(&e))?;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    match trailers.as_ref().and_then(status_of).or_else(|| status_of(&parts.headers)) {
        Some(status) if status.code() != Code::Ok => Err(status),
        Some(_) => {
            let gzip = parts.headers.get("grpc-encoding").is_some_and(|e| e == "gzip");
            // Accepted: an answer that cannot be read still accepted the export (sending it
            // again would store it twice).
            Ok(message(&data, gzip).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "an accepted gRPC export's answer cannot be read; taken as full success");
                Vec::new()
            }))
        }
        None => Err(Status::internal("the answer carries no grpc-status")),
    }
}

/// The status in `headers`, as tonic reads it; `grpc-status-details-bin` that is not base64
/// (which tonic would panic on) is left out.
fn status_of(headers: &http::HeaderMap) -> Option<Status> {
    const DETAILS: &str = "grpc-status-details-bin";
    match headers.get(DETAILS) {
        Some(details) if tonic_base64(details.as_bytes()).is_err() => {
            let mut headers = headers.clone();
            headers.remove(DETAILS);
            Status::from_header_map(&headers)
        }
        _ => Status::from_header_map(headers),
    }
}

/// Decodes as tonic does (standard alphabet, padding optional).
fn tonic_base64(text: &[u8]) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
    use base64::Engine;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_encode_padding(true).with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(text)
}

/// The message of an answer's body: one frame, compressed (only as `grpc-encoding` says:
/// `gzip`) or not.
fn message(data: &[u8], gzip: bool) -> Result<Vec<u8>, Status> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let (header, rest) = data.split_at_checked(5).ok_or_else(|| Status::internal("a truncated answer frame"))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let payload = rest.get(..len).ok_or_else(|| Status::internal("a truncated answer frame"))?;
    match header[0] {
        0 => Ok(payload.to_vec()),
        1 if !gzip => Err(Status::internal("a compressed answer without grpc-encoding: gzip")),
        1 => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(payload)
                .take(MAX_ANSWER as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| Status::internal(format!("the answer's gzip: {e}")))?;
            if out.len() > MAX_ANSWER {
                return Err(Status::internal("the answer is larger than 4 MiB"));
            }
            Ok(out)
        }
        flag => Err(Status::internal(format!("an answer frame with flag {flag}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_status_with_details_that_are_not_base64_is_read_without_them() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert("grpc-message", http::HeaderValue::from_static("too%20big"));
        headers.insert("grpc-status-details-bin", http::HeaderValue::from_static("not base64!"));
        let status = status_of(&headers).unwrap();
        assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "too big"));
        assert!(status.details().is_empty());
        headers.insert("grpc-status-details-bin", http::HeaderValue::from_static("CAg"));
        assert_eq!(status_of(&headers).unwrap().details(), [8, 8], "unpadded base64, as tonic reads it");
        assert!(status_of(&http::HeaderMap::new()).is_none());
    }

    #[test]
    fn a_frame_is_the_flag_the_big_endian_length_and_the_message() {
        assert_eq!(frame(b"abc", false), [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(frame(&[9; 300], true)[..5], [1, 0, 0, 1, 44]);
    }

    #[test]
    fn answers_plain_compressed_empty_or_broken() {
        assert_eq!(message(&frame(b"ok", false), false).unwrap(), b"ok");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"partial success").unwrap();
        let compressed = frame(&gz.finish().unwrap(), true);
        assert_eq!(message(&compressed, true).unwrap(), b"partial success");
        assert!(message(&compressed, false).is_err(), "compressed without saying how");
        assert_eq!(message(&[], false).unwrap(), b"", "no message: an empty response");
        assert!(message(&[0, 0, 0, 0, 9, 1], false).is_err(), "shorter than it says");
        assert!(message(&frame(b"not gzip", true), true).is_err());
        assert!(message(&[2, 0, 0, 0, 0], false).is_err());
    }
}
