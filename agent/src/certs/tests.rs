use base64::Engine;
use rcgen::{CertificateParams, DnType, KeyPair};

use super::*;

/// A self-signed certificate for `cn` expiring at the start of `year`-01-01 UTC.
fn cert_pem(cn: &str, year: i32) -> String {
    let mut params = CertificateParams::new(vec![format!("{cn}.example")]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    params.self_signed(&KeyPair::generate().unwrap()).unwrap().pem()
}

/// Unix seconds of `year`-01-01T00:00:00Z.
fn jan_first(year: i32) -> i64 {
    let days: i64 = (1970..year).map(|y| if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 { 366 } else { 365 }).sum();
    days * 86_400
}

#[test]
fn pem_files_and_chains_yield_each_certificate() {
    let found = certificates_in(cert_pem("kube-apiserver", 2027).as_bytes()).unwrap();
    assert_eq!(found, vec![Found { subject: "CN=kube-apiserver".into(), not_after: jan_first(2027) }]);
    let chain = format!("{}{}", cert_pem("leaf", 2027), cert_pem("intermediate", 2031));
    let subjects: Vec<(String, i64)> = certificates_in(chain.as_bytes()).unwrap().into_iter().map(|f| (f.subject, f.not_after)).collect();
    assert_eq!(subjects, [("CN=leaf".to_string(), jan_first(2027)), ("CN=intermediate".to_string(), jan_first(2031))]);
}

#[test]
fn kubeconfigs_with_embedded_certificates_are_read() {
    let b64 = |pem: String| base64::engine::general_purpose::STANDARD.encode(pem);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster:\n    server: https://10.0.0.1:6443\n    certificate-authority-data: {}\nusers:\n- name: kubelet\n  user:\n    client-certificate-data: {}\n    client-key-data: bm90LWEta2V5\n",
        b64(cert_pem("kubernetes", 2035)),
        b64(cert_pem("system:node:gpu-1", 2027)),
    );
    let mut found = certificates_in(kubeconfig.as_bytes()).unwrap();
    found.sort_by_key(|f| f.not_after);
    assert_eq!(found[0], Found { subject: "CN=system:node:gpu-1".into(), not_after: jan_first(2027) });
    assert_eq!(found[1].subject, "CN=kubernetes");
}

#[test]
fn garbage_and_key_only_files_are_errors_not_panics() {
    assert!(matches!(certificates_in(b"\x00\xffgarbage"), Err(CertError::Empty)));
    let key_only = KeyPair::generate().unwrap().serialize_pem();
    assert!(matches!(certificates_in(key_only.as_bytes()), Err(CertError::Empty)));
    let broken = "-----BEGIN CERTIFICATE-----\nTUlJQm9uZ3VzCg==\n-----END CERTIFICATE-----\n";
    assert!(matches!(certificates_in(broken.as_bytes()), Err(CertError::Malformed(_))));
    assert!(matches!(certificates_in(b"users:\n- user:\n    client-certificate-data: '!!not base64'\n"), Err(CertError::Malformed(_))));
}

#[test]
fn a_refresh_exports_matches_counts_errors_and_forgets_removed_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki/etcd");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(dir.path().join("pki/apiserver.crt"), cert_pem("kube-apiserver", 2027)).unwrap();
    std::fs::write(pki.join("server.crt"), cert_pem("etcd", 2028)).unwrap();
    std::fs::write(pki.join("broken.crt"), "not a certificate").unwrap();
    let patterns = vec![format!("{}/pki/**/*.crt", dir.path().display())];
    let metrics = CertMetrics::default();
    let checked = refresh(&patterns, &metrics, Checked::default());
    assert_eq!(checked.exported.len(), 2);
    let broken = pki.join("broken.crt").display().to_string();
    assert_eq!(checked.failing.keys().collect::<Vec<_>>(), [&broken], "remembered, so it is logged once");
    let apiserver = CertLabels { path: dir.path().join("pki/apiserver.crt").display().to_string(), subject: "CN=kube-apiserver".into() };
    assert_eq!(metrics.not_after.get_or_create(&apiserver).get(), jan_first(2027));
    assert_eq!(metrics.errors.get_or_create(&PathLabels { path: pki.join("broken.crt").display().to_string() }).get(), 1);

    std::fs::remove_file(dir.path().join("pki/apiserver.crt")).unwrap();
    let checked = refresh(&patterns, &metrics, checked);
    assert_eq!(checked.exported.len(), 1);
    assert_eq!(metrics.errors.get_or_create(&PathLabels { path: broken.clone() }).get(), 2, "counted on every check");
    assert!(checked.failing.contains_key(&broken));
    std::fs::write(pki.join("broken.crt"), cert_pem("fixed", 2029)).unwrap();
    assert!(refresh(&patterns, &metrics, checked).failing.is_empty(), "a fixed file is forgotten, so a new failure is logged again");
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("cert", "", metrics.not_after.clone());
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(!text.contains("kube-apiserver") && text.contains("CN=etcd"), "{text}");
}
