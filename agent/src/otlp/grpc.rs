//! One OTLP export over gRPC, framed here rather than by tonic's client: tonic compresses at
//! gzip level 6 and has no setting for it, and at level 6 compression is most of the sink's
//! CPU. The message goes at level 1 like the HTTP path's, in the one length-prefixed frame a
//! unary call carries (`grpc-encoding: gzip`, the compressed flag set), over the same tonic
//! channel (HTTP/2, TLS, the endpoint's origin). The answer's status comes from the trailers,
//! or from the headers of a trailers-only answer, as tonic's own client reads it.

use std::io::Read;

use http_body_util::BodyExt;
use prost::bytes::Bytes;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceExt;

/// The largest answer read (an `Export*ServiceResponse` is a few bytes to a few KiB).
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Frames `message` (already gzip-compressed when `gzip`) as a unary call's request body.
pub fn frame(message: &[u8], gzip: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(u8::from(gzip));
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Calls `path` with the framed `body`; returns the answer message's bytes.
pub async fn unary(channel: &Channel, metadata: &MetadataMap, path: &'static str, body: Vec<u8>, gzip: bool) -> Result<Vec<u8>, Status> {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(Bytes::from(body))))
        .map_err(|e| Status::internal(format!("request: {e}")))?;
    if gzip {
        request.headers_mut().insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
    }
    request.headers_mut().extend(metadata.clone().into_headers());
    let unavailable = |e: &dyn std::fmt::Display| Status::unavailable(e.to_string());
    let answer = channel.clone().oneshot(request).await.map_err(|e| unavailable(&e))?;
    let (parts, body) = answer.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(Status::unavailable(format!("HTTP {} instead of a gRPC answer", parts.status)));
    }
    // A trailers-only answer: the status is in the headers, and there is no message.
    if let Some(status) = Status::from_header_map(&parts.headers) {
        if status.code() != Code::Ok {
            return Err(status);
        }
    }
    let collected = http_body_util::Limited::new(body, MAX_ANSWER + 5).collect().await.map_err(|e| unavailable(&e))?;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let status = trailers.as_ref().and_then(Status::from_header_map).or_else(|| Status::from_header_map(&parts.headers));
    match status {
        Some(status) if status.code() != Code::Ok => return Err(status),
        Some(_) => {}
        None => return Err(Status::internal("the answer carries no grpc-status")),
    }
    message(&data)
}

/// The message of an answer's body: one frame, compressed or not.
fn message(data: &[u8]) -> Result<Vec<u8>, Status> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let (header, rest) = data.split_at_checked(5).ok_or_else(|| Status::internal("a truncated answer frame"))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let payload = rest.get(..len).ok_or_else(|| Status::internal("a truncated answer frame"))?;
    match header[0] {
        0 => Ok(payload.to_vec()),
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
    fn a_frame_is_the_flag_the_big_endian_length_and_the_message() {
        assert_eq!(frame(b"abc", false), [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(frame(&[9; 300], true)[..5], [1, 0, 0, 1, 44]);
    }

    #[test]
    fn answers_plain_compressed_empty_or_broken() {
        assert_eq!(message(&frame(b"ok", false)).unwrap(), b"ok");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"partial success").unwrap();
        assert_eq!(message(&frame(&gz.finish().unwrap(), true)).unwrap(), b"partial success");
        assert_eq!(message(&[]).unwrap(), b"", "no message: an empty response");
        assert!(message(&[0, 0, 0, 0, 9, 1]).is_err(), "shorter than it says");
        assert!(message(&frame(b"not gzip", true)).is_err());
        assert!(message(&[2, 0, 0, 0, 0]).is_err());
    }
}
