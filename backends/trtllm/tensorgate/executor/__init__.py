"""The executor: owns one engine and serves it over gRPC (token ids in, token ids out)."""
