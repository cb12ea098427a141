"""gRPC Configure loads a real LeRobot checkpoint through the engine's model cache."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("lerobot")

from lerobot_checkpoints import act_dir  # noqa: E402,F401
from protocol_servers import running  # noqa: E402

from policylink.backends.lerobot import load_from_request  # noqa: E402
from policylink.client import PolicyClient  # noqa: E402
from policylink.errors import ServerError  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402
from policylink.server.grpc_server import GrpcServer  # noqa: E402


def test_configure_infer_and_reuse_over_grpc(act_dir, tmp_path):
    engine = Engine(loader=load_from_request)
    server = GrpcServer(engine, "127.0.0.1", 0)
    with running(engine, [server]):
        url = f"grpc://127.0.0.1:{server.port}"
        with PolicyClient(url, timeout=60) as first, PolicyClient(url, timeout=60) as second:
            assert first.metadata is None  # idle until configured
            with pytest.raises(ServerError, match="no model loaded"):
                first.infer({"observation.state": np.zeros(6, np.float32)})
            with pytest.raises(ServerError, match="missing.* does not exist"):
                first.configure(str(tmp_path / "missing"), device="cpu")
            metadata = first.configure(str(act_dir), device="cpu", task="pick")
            assert (metadata.action_dim, metadata.horizon, metadata.policy_type) == (6, 16, "act")
            assert first.metadata == metadata
            obs = {"observation.state": np.ones(6, np.float32), "observation.images.front": np.zeros((48, 64, 3), np.uint8)}
            chunk = first.infer(obs)
            assert chunk.shape == (16, 6) and np.isfinite(chunk).all()
            second.configure(str(act_dir), device="cpu")
            np.testing.assert_allclose(second.infer(obs), chunk, rtol=1e-5, atol=1e-5)
        stats = engine.models.stats()
        assert stats["models_loaded"] == 1 and stats["model_cache_hits"] == 1
