"""secretfs: Kubernetes secrets served from memory over a read-only FUSE filesystem."""

__version__ = "0.1.0"
