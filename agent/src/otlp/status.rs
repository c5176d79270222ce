//! The `google.rpc.Status` an OTLP receiver answers errors with, whose `RetryInfo` says how
//! long to wait.

use std::time::Duration;

use prost::Message;

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The delay a `RetryInfo` detail asks for, from the encoded `google.rpc.Status` of an error
/// (gRPC's `grpc-status-details-bin`); bounded to an hour.
pub fn retry_delay(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let info = status.details.iter().find(|d| d.type_url == RETRY_INFO)?;
    let delay = RetryInfo::decode(info.value.as_slice()).ok()?.retry_delay?;
    let delay = Duration::new(delay.seconds.clamp(0, 3600) as u64, delay.nanos.clamp(0, 999_999_999) as u32);
    Some(delay.min(Duration::from_secs(3600)))
}

/// The message of an OTLP/HTTP error body (an encoded `google.rpc.Status`).
pub fn message(body: &[u8]) -> String {
    match RpcStatus::decode(body) {
        Ok(status) => status.message,
        Err(_) => format!("({} bytes that are not a google.rpc.Status)", body.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with_delay(seconds: i64, nanos: i32) -> Vec<u8> {
        let info = RetryInfo { retry_delay: Some(ProtoDuration { seconds, nanos }) };
        RpcStatus {
            code: 14,
            message: "busy".into(),
            details: vec![
                ProtoAny { type_url: "type.googleapis.com/google.rpc.DebugInfo".into(), value: vec![1, 2, 3] },
                ProtoAny { type_url: RETRY_INFO.into(), value: info.encode_to_vec() },
            ],
        }
        .encode_to_vec()
    }

    #[test]
    fn retry_info_is_found_among_details() {
        assert_eq!(retry_delay(&status_with_delay(2, 500_000_000)), Some(Duration::from_millis(2500)));
        assert_eq!(retry_delay(&status_with_delay(86_400, 0)), Some(Duration::from_secs(3600)));
        assert_eq!(retry_delay(&status_with_delay(-5, 0)), Some(Duration::ZERO));
        assert_eq!(retry_delay(&[]), None);
        assert_eq!(retry_delay(b"\xff\xff\xff"), None);
        assert_eq!(message(&status_with_delay(1, 0)), "busy");
    }
}
