"""The generated CSI messages and stubs (csi/gen/) as Any: generated code stays out of mypy."""

from __future__ import annotations

import importlib
from typing import Any

csi_pb2: Any = importlib.import_module("csi.gen.csi_pb2")
csi_pb2_grpc: Any = importlib.import_module("csi.gen.csi_pb2_grpc")
