# kvmesh: build with the official Rust image, run on slim Debian as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin kvmesh \
 && cp target/release/kvmesh /kvmesh

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin kvmesh
COPY --from=build /kvmesh /usr/local/bin/kvmesh
COPY config /etc/kvmesh
USER kvmesh
EXPOSE 4040
# Inside a container the text protocol must listen beyond loopback.
ENV KVMESH_LISTEN=0.0.0.0:4040
# `kvmesh ping` asks the configured address (KVMESH_LISTEN), so the check
# follows the node when its port moves.
HEALTHCHECK --interval=5s --timeout=3s --retries=5 CMD ["kvmesh", "ping"]
ENTRYPOINT ["kvmesh"]
