# Multi-stage: build with the Rust toolchain, run on a small Debian base (glibc, CA roots).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p nodelens && strip target/release/nodelens

FROM debian:bookworm-slim
# systemd for journalctl (node_logs.journald): systemd's own reader of the host's journal files
# (compact, keyed-hash, zstd since systemd 252). About 16 MB with libsystemd-shared and its
# libraries; nothing of it runs but journalctl.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates systemd && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nodelens /usr/local/bin/nodelens
# Non-root by default; the DaemonSet runs it as uid 0 to read root-owned host files (see
# deploy/base/daemonset.yaml for why that needs no capability).
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["/usr/local/bin/nodelens"]
CMD ["run"]
