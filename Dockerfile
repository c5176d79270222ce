# Multi-stage: build with the Rust toolchain, run on a small Debian base (glibc, CA roots).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p nodelens && strip target/release/nodelens

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nodelens /usr/local/bin/nodelens
# Non-root by default; the DaemonSet runs it as uid 0 to read root-owned host files (see
# deploy/base/daemonset.yaml for why that needs no capability).
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["/usr/local/bin/nodelens"]
CMD ["run"]
