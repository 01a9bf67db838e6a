# The clustermesh image the Helm chart runs (apiserver and agent in one binary).
# Not built by CI: this workplace has no container engine. Build it where one runs:
#   docker build -t ghcr.io/clustermesh/clustermesh:0.1.0 .
FROM rust:1.95-bookworm AS build
# The build's Debian packages (the build part of scripts/deps' list).
RUN apt-get update && apt-get install -y --no-install-recommends \
      protobuf-compiler libprotobuf-dev clang llvm libbpf-dev linux-libc-dev \
      && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p clustermesh

FROM debian:bookworm-slim
# What the agent runs (the runtime part of scripts/deps' list): iproute2 and util-linux
# (nsenter) to find endpoint interfaces, mount to mount bpffs and cgroup v2 when missing.
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 util-linux mount ca-certificates \
      && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/clustermesh /usr/local/bin/clustermesh
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/clustermesh"]
