"""policylink: remote inference for learned robot policies.

The base install is the robot-side client::

    from policylink import PolicyClient
    client = PolicyClient("ws://gpu-box:8000")
    chunk = client.infer({"observation.state": state})   # (horizon, action_dim) float32

The server side (``policylink serve``) lives in :mod:`policylink.server`.
"""

from .allocator import tune_allocator
from .client import ActionChunk, PolicyClient
from .errors import (
    ConnectionFailed,
    InferenceTimeout,
    PolicyLinkError,
    ProtocolError,
    ServerBusy,
    ServerError,
)
from .types import Feature, Policy, PolicyMetadata

__version__ = "0.1.0"

__all__ = [
    "PolicyClient",
    "ActionChunk",
    "Policy",
    "PolicyMetadata",
    "Feature",
    "PolicyLinkError",
    "ServerError",
    "ServerBusy",
    "InferenceTimeout",
    "ProtocolError",
    "ConnectionFailed",
    "tune_allocator",
    "__version__",
]
