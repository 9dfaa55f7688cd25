"""The generated provider plugin messages and stubs (providers/plugin/gen/) as Any: generated code
stays out of mypy, as csi/pb.py does for CSI."""

from __future__ import annotations

import importlib
from typing import Any

service_pb2: Any = importlib.import_module("providers.plugin.gen.service_pb2")
service_pb2_grpc: Any = importlib.import_module("providers.plugin.gen.service_pb2_grpc")
