use std::io::Write;
use std::time::Duration;

use super::*;

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    load(Some(file.path()), vars(env))
}

#[test]
fn no_file_gives_the_spec_defaults() {
    let config = load(None, vars(&[])).unwrap();
    assert_eq!(config.logs.pods_dir, Path::new("/var/log/pods"));
    assert_eq!(config.logs.max_line_bytes, 1_048_576);
    assert_eq!(config.state_dir, Path::new("/var/lib/nodelens"));
    assert_eq!(config.metrics.listen.to_string(), "0.0.0.0:9400");
    assert_eq!(config.sinks.elasticsearch.data_stream, "logs-kubernetes.container_logs-default");
    assert_eq!(config.sinks.elasticsearch.flush_interval, Duration::from_secs(1));
    assert_eq!(config.gpu.poll_interval, Duration::from_secs(5));
    assert_eq!(config.kubernetes.app_keys[0], "label:app.kubernetes.io/name");
    assert!(config.stdout_enabled(), "stdout is the sink when nothing else is configured");
}

#[test]
fn unknown_key_is_an_error_naming_its_path() {
    let err = load_text("logs:\n  pods_dri: /x\n", &[]).unwrap_err().to_string();
    assert!(err.contains("logs.pods_dri"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
    let err = load_text("logs:\n  json: of\n", &[]).unwrap_err().to_string();
    assert!(err.contains("logs.json") && err.contains("expected `auto` or `off`"), "{err}");
    let err = load_text("logs:\n  rate_limit:\n    records_per_sec: 100\n", &[]).unwrap_err().to_string();
    assert!(err.contains("logs.rate_limit.records_per_sec"), "{err}");
    let err = load_text("logs:\n  rate_limit:\n    records_per_second: -5\n", &[]).unwrap_err().to_string();
    assert!(err.contains("logs.rate_limit.records_per_second"), "{err}");
}

#[test]
fn wrong_type_is_an_error_naming_its_path() {
    let err = load_text("logs:\n  max_line_bytes: lots\n", &[]).unwrap_err().to_string();
    assert!(err.contains("logs.max_line_bytes"), "{err}");
    let err = load_text("metrics:\n  listen: nowhere\n", &[]).unwrap_err().to_string();
    assert!(err.contains("metrics.listen"), "{err}");
    let err = load_text("gpu:\n  poll_interval: soon\n", &[]).unwrap_err().to_string();
    assert!(err.contains("gpu.poll_interval") && err.contains("not a duration"), "{err}");
}

#[test]
fn variables_in_the_file_are_expanded() {
    let config =
        load_text("node_name: ${NODE_NAME}\ncluster_name: ${CLUSTER:-dev}\nstate_dir: /s/$${literal}\n", &[("NODE_NAME", "gpu-node-7")])
            .unwrap();
    assert_eq!(config.node_name, "gpu-node-7");
    assert_eq!(config.cluster_name, "dev");
    assert_eq!(config.state_dir, Path::new("/s/${literal}"));
}

#[test]
fn env_overrides_reach_nested_keys_with_the_right_types() {
    let config = load_text(
        "logs:\n  max_line_bytes: 2048\n",
        &[
            ("NODELENS_SINKS__ELASTICSEARCH__ENDPOINTS", "http://es-1:9200, http://es-2:9200"),
            ("NODELENS_LOGS__MAX_LINE_BYTES", "4096"),
            ("NODELENS_LOGS__PODS_DIR", "/tmp/pods"),
            ("NODELENS_CLUSTER_NAME", "123"),
            ("NODELENS_SINKS__STDOUT__ENABLED", "true"),
            ("NODELENS_GPU__POLL_INTERVAL", "250ms"),
        ],
    )
    .unwrap();
    assert_eq!(config.sinks.elasticsearch.endpoints, ["http://es-1:9200", "http://es-2:9200"]);
    assert_eq!(config.logs.max_line_bytes, 4096, "env wins over the file");
    assert_eq!(config.logs.pods_dir, Path::new("/tmp/pods"));
    assert_eq!(config.cluster_name, "123", "string keys keep digits as text");
    assert_eq!(config.sinks.stdout.enabled, Switch::On);
    assert_eq!(config.gpu.poll_interval, Duration::from_millis(250));
}

#[test]
fn env_override_of_an_unknown_key_names_the_variable() {
    let err = load(None, vars(&[("NODELENS_LOGS__PODS_DRI", "/x")])).unwrap_err().to_string();
    assert!(err.contains("NODELENS_LOGS__PODS_DRI") && err.contains("logs.pods_dri"), "{err}");
    let err = load(None, vars(&[("NODELENS_LOGS", "x")])).unwrap_err().to_string();
    assert!(err.contains("is a section"), "{err}");
}

#[test]
fn switches_accept_booleans_and_auto_only() {
    let config = load_text("gpu:\n  enabled: false\nkubernetes:\n  enabled: auto\n", &[]).unwrap();
    assert_eq!(config.gpu.enabled, Switch::Off);
    assert_eq!(config.kubernetes.enabled, Switch::Auto);
    let err = load_text("gpu:\n  enabled: maybe\n", &[]).unwrap_err().to_string();
    assert!(err.contains("gpu.enabled"), "{err}");
}

#[test]
fn validation_rejects_what_serde_cannot() {
    let bad_glob = load_text("logs:\n  exclude_namespaces: ['kube-[system']\n", &[]).unwrap().validate();
    assert!(bad_glob.unwrap_err().to_string().contains("logs.exclude_namespaces[0]"));
    let bad_url = load_text("sinks:\n  elasticsearch:\n    endpoints: [es:9200]\n", &[]).unwrap().validate();
    assert!(bad_url.unwrap_err().to_string().contains("sinks.elasticsearch.endpoints[0]"));
    let no_sink = load_text("sinks:\n  stdout:\n    enabled: false\n", &[]).unwrap().validate();
    assert!(no_sink.unwrap_err().to_string().contains("no sink is enabled"));
}

#[test]
fn node_name_falls_back_to_a_non_empty_name() {
    let config = load(None, vars(&[])).unwrap().validate().unwrap();
    assert!(!config.node_name.is_empty());
}

#[test]
fn printed_config_hides_secrets_and_parses_back() {
    let config = load_text(
        "sinks:\n  elasticsearch:\n    endpoints: [https://es:9200, 'http://elastic:pa55word@es-2:9200']\n    api_key: c2VjcmV0\n",
        &[("NODELENS_SINKS__ELASTICSEARCH__PASSWORD", "hunter2")],
    )
    .unwrap();
    let yaml = config.to_yaml();
    assert!(!yaml.contains("c2VjcmV0") && !yaml.contains("hunter2") && !yaml.contains("pa55word"), "{yaml}");
    assert!(yaml.contains("<redacted>"));
    let reparsed: Config = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(reparsed.sinks.elasticsearch.endpoints, ["https://es:9200", "http://elastic:redacted@es-2:9200/"]);
    assert_eq!(reparsed.logs.partial_timeout, config.logs.partial_timeout);
}

#[test]
fn env_expansion_leaves_lone_dollars_alone() {
    let out = env::expand("a $ b ${X} ${Y:-y} $$", |n| (n == "X").then(|| "x".to_string()));
    assert_eq!(out, "a $ b x y $");
}

#[test]
fn kubernetes_keys_and_multiline_rules_are_validated() {
    let bad_key = load_text("kubernetes:\n  app_keys: [\"label:app\", \"labels:x\"]\n", &[]).unwrap().validate();
    assert!(bad_key.unwrap_err().to_string().contains("kubernetes.app_keys[1]"));
    let bad_regex = load_text("logs:\n  multiline:\n    - {app: \"*\", start_pattern: \"^(Traceback\"}\n", &[]).unwrap().validate();
    assert!(bad_regex.unwrap_err().to_string().contains("logs.multiline[0].start_pattern"));
    let good = load_text("logs:\n  multiline:\n    - {app: \"train*\", start_pattern: \"^\\\\S\", timeout: 1s}\n", &[])
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(good.logs.multiline[0].timeout, Duration::from_secs(1));
}

#[test]
fn log_metric_rules_are_validated_naming_the_rule_and_the_reason() {
    for (rule, reason) in [
        ("{name: loss, pattern: 'loss=(?P<v>[0-9.]+)', type: gauge}", "needs a value group"),
        ("{name: loss, pattern: 'loss=(', type: counter}", "pattern"),
        ("{name: loss, pattern: 'loss=(?P<v>.+)', type: counter, value: x}", "no group named `x`"),
        ("{name: loss, pattern: '(?P<pod>.+)', type: counter, labels: [pod]}", "`pod` is reserved"),
        ("{name: loss, pattern: '(?P<job>.+)', type: counter, labels: [job]}", "`job` is reserved"),
        ("{name: loss, pattern: '(?P<__x>.+)', type: counter, labels: [__x]}", "`__x` is reserved"),
        ("{name: loss, app: '[', pattern: 'x', type: counter}", "app"),
    ] {
        let err = load_text(&format!("logs:\n  log_metrics:\n    - {rule}\n"), &[]).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("logs.log_metrics[0] (loss)") && err.contains(reason), "{rule}: {err}");
    }
    let good =
        load_text("logs:\n  log_metrics:\n    - {name: loss, pattern: 'loss=(?P<v>[0-9.]+)', type: gauge, value: v}\n", &[]).unwrap();
    assert!(good.validate().is_ok());
}

#[test]
fn zero_periods_and_out_of_range_sizes_are_refused_naming_the_key() {
    for (key, yaml) in [
        ("gpu.poll_interval", "gpu:\n  poll_interval: 0s\n"),
        ("host.scan_interval", "host:\n  scan_interval: 0s\n"),
        ("certificates.interval", "certificates:\n  interval: 0s\n"),
        ("sinks.elasticsearch.request_timeout", "sinks:\n  elasticsearch:\n    request_timeout: 0s\n"),
        ("sinks.elasticsearch.flush_interval", "sinks:\n  elasticsearch:\n    flush_interval: 0s\n"),
        ("logs.partial_timeout", "logs:\n  partial_timeout: 0s\n"),
        ("logs.multiline[0].timeout", "logs:\n  multiline:\n    - {app: '*', start_pattern: '^x', timeout: 0s}\n"),
        ("sinks.elasticsearch.batch_max_bytes", "sinks:\n  elasticsearch:\n    batch_max_bytes: 1000000000\n"),
        ("logs.max_line_bytes", "logs:\n  max_line_bytes: 1000000000\n  max_inflight_bytes: 1000000000\n"),
        ("logs.max_inflight_bytes", "logs:\n  max_inflight_bytes: 100000000000\n"),
        ("sinks.elasticsearch.flush_interval", "sinks:\n  elasticsearch:\n    flush_interval: 200000000000000d\n"),
        ("kubernetes.metadata_wait", "kubernetes:\n  metadata_wait: 400d\n"),
        ("sinks.elasticsearch.item_max_attempts", "sinks:\n  elasticsearch:\n    item_max_attempts: 0\n"),
    ] {
        let err = load_text(yaml, &[]).and_then(Config::validate).expect_err(key).to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    assert!(load_text("gpu:\n  poll_interval: 100ms\n", &[]).and_then(Config::validate).is_ok(), "small but sane is fine");
}

#[test]
fn otlp_headers_come_from_the_file_or_the_environment_and_are_never_printed() {
    let config = load_text(
        "sinks:\n  otlp:\n    endpoint: http://collector:4318\n    headers:\n      X-Scope-OrgID: tenant-7\n",
        &[
            ("NODELENS_SINKS__OTLP__HEADERS__AUTHORIZATION", "Bearer t0ken"),
            ("NODELENS_SINKS__OTLP__HEADERS__X_API_KEY", "k3y"),
            ("NODELENS_METRICS__OTLP__PROTOCOL", "grpc"),
        ],
    )
    .unwrap()
    .validate()
    .unwrap();
    let headers = &config.sinks.otlp.headers;
    assert_eq!(headers.get("X-Scope-OrgID").map(String::as_str), Some("tenant-7"));
    assert_eq!(headers.get("authorization").map(String::as_str), Some("Bearer t0ken"));
    assert_eq!(headers.get("x-api-key").map(String::as_str), Some("k3y"), "{headers:?}");
    assert_eq!(config.metrics.otlp.protocol, OtlpProtocol::Grpc);
    assert!(!config.stdout_enabled(), "OTLP is a sink: stdout stays off on auto");
    let yaml = config.to_yaml();
    assert!(!yaml.contains("t0ken") && !yaml.contains("tenant-7") && yaml.contains("authorization"), "{yaml}");
    let err = load_text("sinks:\n  otlp:\n    endpoint: http://c:4318\n", &[("NODELENS_SINKS__OTLP__HEADERS__A__B", "x")]).unwrap_err();
    assert!(err.to_string().contains("not a config key"), "{err}");
}

#[test]
fn otlp_settings_are_checked() {
    for (text, key) in [
        ("sinks:\n  otlp:\n    endpoint: collector:4317\n", "sinks.otlp.endpoint"),
        ("sinks:\n  otlp:\n    endpoint: http://c:4317\n    protocol: grpc-web\n", "sinks.otlp.protocol"),
        ("sinks:\n  otlp:\n    endpoint: http://c:4317\n    max_attempts: 0\n", "sinks.otlp.max_attempts"),
        ("sinks:\n  otlp:\n    endpoint: http://c:4317\n    batch_max_bytes: 100\n", "sinks.otlp.batch_max_bytes"),
        ("sinks:\n  otlp:\n    endpoint: http://c:4317\n    headers: {\"bad name\": x}\n", "sinks.otlp.headers.bad name"),
        ("sinks:\n  otlp:\n    endpoint: http://c:4318\n    headers: {Content-Length: \"0\"}\n", "sinks.otlp.headers.Content-Length"),
        ("metrics:\n  otlp:\n    endpoint: http://c:4318\n    headers: {content-encoding: br}\n", "metrics.otlp.headers.content-encoding"),
        ("metrics:\n  otlp:\n    endpoint: http://c:4317\n    interval: 10ms\n", "metrics.otlp.interval"),
        (
            "sinks:\n  otlp:\n    endpoint: http://c:4317\n    protocol: grpc\n    headers: {x-sig-bin: abc}\n",
            "sinks.otlp.headers.x-sig-bin",
        ),
        ("sinks:\n  otlp:\n    endpoint: http://c:4317\n    protocol: grpc\n    batch_max_bytes: 8388608\n", "sinks.otlp.batch_max_bytes"),
    ] {
        let err = load_text(text, &[]).and_then(Config::validate).unwrap_err();
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
    let only_otlp = "sinks:\n  stdout:\n    enabled: false\n  otlp:\n    endpoint: https://c:4318\n";
    assert!(load_text(only_otlp, &[]).unwrap().validate().is_ok(), "OTLP alone is a sink");
}

#[test]
fn logs_json_takes_auto_off_and_the_false_an_unquoted_off_becomes_in_yaml_1_1() {
    for (text, mode) in [("auto", JsonMode::Auto), ("off", JsonMode::Off), ("'off'", JsonMode::Off), ("false", JsonMode::Off)] {
        let config = load_text(&format!("logs:\n  json: {text}\n"), &[]).unwrap();
        assert_eq!(config.logs.json, mode, "{text}");
    }
    assert!(load_text("logs:\n  json: true\n", &[]).is_err(), "true is not a mode");
}

#[test]
fn data_stream_names_elasticsearch_would_refuse_stop_the_start() {
    // Fits with `default`, not with the longest namespace.
    let long = format!("sinks:\n  elasticsearch:\n    data_stream: logs-{}-{{namespace}}\n", "a".repeat(200));
    for (yaml, key) in [
        ("sinks:\n  elasticsearch:\n    data_stream: Logs-App-default\n", "sinks.elasticsearch.data_stream"),
        (long.as_str(), "sinks.elasticsearch.data_stream"),
        ("sinks:\n  elasticsearch:\n    data_stream: logs-my app-default\n", "sinks.elasticsearch.data_stream"),
        ("sinks:\n  elasticsearch:\n    data_stream: logs-app-{namspace}\n", "sinks.elasticsearch.data_stream"),
        ("sinks:\n  elasticsearch:\n    node_data_stream: logs-node-{namespace}\n", "sinks.elasticsearch.node_data_stream"),
        ("sinks:\n  elasticsearch:\n    gpu_runs_data_stream: _runs-gpu-default\n", "sinks.elasticsearch.gpu_runs_data_stream"),
    ] {
        let err = load_text(yaml, &[]).unwrap().validate().map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(key), "{yaml}: {err}");
    }
    for name in [
        "logs-kubernetes.container_logs-{namespace}",
        "logs-team.app-prod",
        "logs-kubernetes.container_logs-default",
        "k8slogs",
        "logs-my-app-default",
    ] {
        let config = load_text(&format!("sinks:\n  elasticsearch:\n    data_stream: {name}\n"), &[]).unwrap();
        assert!(config.validate().is_ok(), "{name}");
    }
}

#[test]
fn events_take_the_lease_namespace_and_holder_from_the_downward_api_and_check_the_lease_name() {
    let key_error = |key: &str, message: String| ConfigError::Key { origin: "config".into(), key: key.into(), message };
    let env = |name: &str| match name {
        "POD_NAMESPACE" => Some("monitoring".to_string()),
        "POD_NAME" => Some("nodelens-x7k2p".to_string()),
        _ => None,
    };
    let config = load(None, vars(&[])).unwrap();
    assert!(!config.kubernetes.events.enabled, "off unless asked for (the shipped manifests ask)");
    assert_eq!(config.kubernetes.events.lease_name, "nodelens-events");
    assert_eq!(config.sinks.elasticsearch.events_data_stream, "logs-kubernetes.event-default");
    assert_eq!(config.events_identity(env, &key_error).unwrap(), None);

    let on = load_text("kubernetes:\n  events:\n    enabled: true\n", &[]).unwrap();
    let identity = on.events_identity(env, &key_error).unwrap().unwrap();
    assert_eq!(
        identity,
        EventsIdentity { lease: "nodelens-events".into(), namespace: "monitoring".into(), holder: "nodelens-x7k2p".into() }
    );
    let err = on.events_identity(|_| None, &key_error).unwrap_err().to_string();
    assert!(err.contains("kubernetes.events.enabled") && err.contains("POD_NAME") && err.contains("POD_NAMESPACE"), "{err}");

    for bad in ["Nodelens", "-events", "events-", "a_b", ""] {
        let config = load_text(&format!("kubernetes:\n  events:\n    enabled: true\n    lease_name: '{bad}'\n"), &[]).unwrap();
        let err = config.events_identity(env, &key_error).unwrap_err().to_string();
        assert!(err.contains("kubernetes.events.lease_name"), "{bad}: {err}");
    }
    let off_api = load_text("kubernetes:\n  enabled: false\n  events:\n    enabled: true\n", &[]).unwrap();
    assert_eq!(off_api.events_identity(|_| None, &key_error).unwrap(), None, "no API, no election");
    let unknown = load_text("kubernetes:\n  events:\n    lease: x\n", &[]).unwrap_err().to_string();
    assert!(unknown.contains("kubernetes.events"), "{unknown}");
}
