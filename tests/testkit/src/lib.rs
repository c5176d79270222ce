//! Test doubles and simulators for the nodelens end-to-end tests: a kubelet that writes and
//! rotates container logs exactly as the real one does, and a harness that runs the real
//! `nodelens` binary and collects what it emits.

pub mod agent;
pub mod elasticsearch;
pub mod gpu;
pub mod http;
pub mod kubelet;
pub mod kubernetes;
pub mod node;
pub mod otlp;
pub mod views;

/// Compares what was emitted with what was written and panics with a short report: the
/// count of each, the records missing, the ones seen twice, and the first place the order differs.
pub fn assert_same_records(what: &str, got: &[String], want: &[String]) {
    if got == want {
        return;
    }
    let mut seen = std::collections::HashMap::new();
    for g in got {
        *seen.entry(g.as_str()).or_insert(0) += 1;
    }
    let missing: Vec<&String> = want.iter().filter(|w| !seen.contains_key(w.as_str())).take(10).collect();
    let twice: Vec<&&str> = seen.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k).take(10).collect();
    let first_diff = got.iter().zip(want).position(|(g, w)| g != w);
    let context =
        first_diff.map(|i| (i, &got[i.saturating_sub(2)..(i + 3).min(got.len())], &want[i.saturating_sub(2)..(i + 3).min(want.len())]));
    panic!(
        "{what}: got {} records, want {}\nmissing (first 10): {missing:?}\nduplicated (first 10): {twice:?}\nfirst difference (index, got, want): {context:?}",
        got.len(),
        want.len()
    );
}
