"""CSI node plugin: the kubelet-facing gRPC side of secretfs (no FUSE, no provider SDKs)."""
