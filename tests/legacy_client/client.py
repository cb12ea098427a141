"""A legacy pickle-over-TCP policy client, as such clients are written (no policylink code).

Usage: python client.py HOST PORT SCENARIO STATE_DIM CAMERAS
Prints one JSON line per request describing what came back.
"""

import json
import pickle
import socket
import struct
import sys

import numpy as np

from benchmark.base import MetaAction, MetaObs


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def request(sock, meta_obs):
    payload = pickle.dumps(meta_obs)
    sock.sendall(struct.pack(">I", len(payload)))
    sock.sendall(payload)
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    return recv_exactly(sock, length)


def describe(reply_bytes):
    """What the client's code sees: its own MetaAction objects, or the error its pickle.loads raises."""
    try:
        actions = pickle.loads(reply_bytes)
    except Exception as exc:  # legacy clients log this and treat the reply as an empty list
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "count": len(actions),
        "own_class": all(type(a) is MetaAction for a in actions),
        "ctrl_space": sorted({a.ctrl_space for a in actions}),
        "ctrl_type": sorted({a["ctrl_type"] for a in actions}),
        "gripper_continuous": sorted({bool(a.gripper_continuous) for a in actions}),
        "action_shapes": sorted({tuple(a.action.shape) for a in actions}),
        "actions": [a.action.tolist() for a in actions],
    }


def observation(t, state_dim, cameras, batched=False):
    rng = np.random.default_rng(t)
    obs = MetaObs(
        state=np.full(state_dim, 0.1 * t, dtype=np.float32),
        image=rng.integers(0, 256, (cameras, 3, 48, 64), dtype=np.uint8),
        raw_lang="pick up the cube",
        timestep=np.array([[t]]),
    )
    if batched:
        obs.to_batch()
    return obs


def main():
    host, port, scenario, state_dim, cameras = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    with socket.create_connection((host, port), timeout=30) as sock:
        if scenario == "five":
            for t in range(5):
                print(json.dumps(describe(request(sock, observation(t, state_dim, cameras, batched=t % 2 == 1)))), flush=True)
        elif scenario == "bad-then-good":
            print(json.dumps(describe(request(sock, observation(1, state_dim + 6, cameras)))), flush=True)
            print(json.dumps(describe(request(sock, observation(2, state_dim, cameras)))), flush=True)
        elif scenario == "hostile":
            class Exploit:
                def __reduce__(self):
                    import os
                    return (os.system, ("echo pwned",))
            print(json.dumps(describe(request(sock, Exploit()))), flush=True)
            print(json.dumps(describe(request(sock, observation(3, state_dim, cameras)))), flush=True)
        elif scenario == "foreign-module":
            import types
            Other = type("MetaObs", (), {"__module__": "mylab.types"})
            sys.modules["mylab"] = types.ModuleType("mylab")
            sys.modules["mylab.types"] = types.ModuleType("mylab.types")
            sys.modules["mylab.types"].MetaObs = Other
            obs = Other()
            obs.state = np.zeros(state_dim, np.float32)
            print(json.dumps(describe(request(sock, obs))), flush=True)


if __name__ == "__main__":
    main()
