"""The ``policylink`` command line, run as a real process."""

from __future__ import annotations

import signal
import subprocess

import pytest

from conftest import POLICYLINK, free_port, wait_healthy

@pytest.fixture
def served_cli():
    processes = []

    def start(*flags: str) -> int:
        port = free_port()
        process = subprocess.Popen(
            [*POLICYLINK, "serve", "--host", "127.0.0.1", "--port", str(port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        processes.append(process)
        wait_healthy(port, process)
        return port

    yield start, processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_help_explains_commands():
    out = subprocess.run([*POLICYLINK, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "infer", "demo"):
        assert command in out
    serve_help = subprocess.run([*POLICYLINK, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--policy.path" in serve_help and "--policy.type" in serve_help


def test_serve_infer_and_clean_shutdown_on_sigterm(served_cli):
    start, processes = served_cli
    port = start("--policy.type", "random", "--policy.action_dim", "14", "--policy.horizon", "50", "--policy.cameras", "front=96x128")
    out = subprocess.run(
        [*POLICYLINK, "infer", "--server", f"ws://127.0.0.1:{port}", "--repeat", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "chunk (50, 14)" in out.stdout
    assert "observation.images.front [96, 128, 3] uint8" in out.stdout
    process = processes[0]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    log = process.stdout.read()
    assert "serving policy builtin/random on ws://127.0.0.1" in log
    assert "server stopped" in log


def test_ctrl_c_stops_server(served_cli):
    start, processes = served_cli
    start("--policy.type", "zeros")
    processes[0].send_signal(signal.SIGINT)
    assert processes[0].wait(timeout=20) == 0


def test_idle_serve_and_infer_explains(served_cli):
    start, _ = served_cli
    port = start()
    out = subprocess.run([*POLICYLINK, "infer", "--server", f"ws://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "idle" in out.stderr


def test_infer_without_server_fails_clearly():
    out = subprocess.run(
        [*POLICYLINK, "infer", "--server", f"ws://127.0.0.1:{free_port()}", "--connect-timeout", "0.5"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "no policy server at" in out.stderr


def test_demo_runs_end_to_end():
    out = subprocess.run([*POLICYLINK, "demo", "--requests", "3", "--latency-ms", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("chunk (16, 6)") == 3
    assert "demo: done" in out.stdout


def test_bad_camera_spec_is_a_clear_error():
    out = subprocess.run([*POLICYLINK, "serve", "--policy.type", "zeros", "--policy.cameras", "front=big"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "bad camera spec 'front=big'" in out.stderr


def test_compile_with_a_builtin_policy_is_a_clear_error():
    out = subprocess.run([*POLICYLINK, "serve", "--policy.type", "zeros", "--compile"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "--compile applies to LeRobot checkpoints" in out.stderr


def test_serve_batching_flags_reach_the_engine():
    import argparse

    from policylink.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers())
    default = serve_cli.batch_options_from_args(parser.parse_args(["serve"]))
    chosen = serve_cli.batch_options_from_args(parser.parse_args(["serve", "--max-batch", "4", "--no-overlap"]))
    assert (default.max_batch, default.overlap) == (8, True)
    assert (chosen.max_batch, chosen.overlap) == (4, False)
