"""Run crossws itself (npm ``crossws`` 0.4.17) in Node, for tests that compare against it.

The package is installed once into ``.var/node`` with npm. Without Node or npm the tests
that need it are skipped, unless ``CROSSWS_REQUIRE_NODE=1`` (set by CI) makes that a
failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / ".var" / "node"
CROSSWS_VERSION = "0.4.17"
PACKAGES = {"crossws": CROSSWS_VERSION}


def node_prefix(extra: dict[str, str] | None = None) -> Path:
    """The directory holding node_modules with crossws (and ``extra`` packages)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = "Node.js and npm are needed to run crossws"
        if os.environ.get("CROSSWS_REQUIRE_NODE") == "1":
            pytest.fail(f"{message} and CROSSWS_REQUIRE_NODE=1", pytrace=False)
        pytest.skip(message)
    wanted = {**PACKAGES, **(extra or {})}
    missing = [
        f"{name}@{version}"
        for name, version in wanted.items()
        if _installed_version(name) != version
    ]
    if missing:
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        package_json = NODE_DIR / "package.json"
        if not package_json.exists():
            package_json.write_text('{"name": "crossws-channels-tests", "private": true}\n')
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", *missing],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR


def _installed_version(name: str) -> str | None:
    manifest = NODE_DIR / "node_modules" / name / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def run_node(script: str, payload: Any, timeout: float = 60) -> Any:
    """Run an ES module ``script`` with ``payload`` as JSON on stdin; return its JSON output."""
    prefix = node_prefix()
    result = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=prefix,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"node failed ({result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout)


# The clients crossws's sync drivers take, pinned for repeatable runs.
CLIENT_PACKAGES = {"ioredis": "6.0.0", "pg": "8.23.1"}
SERVER_SCRIPT = Path(__file__).with_name("crossws_server.mjs")


class CrosswsServer:
    """A crossws server (tests/node/crossws_server.mjs) on a shared backplane."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.port = port
        prefix = node_prefix(CLIENT_PACKAGES)
        # Node resolves packages from the script's directory upwards; run a copy in the
        # directory that holds node_modules.
        script = prefix / SERVER_SCRIPT.name
        script.write_text(SERVER_SCRIPT.read_text())
        self.process = subprocess.Popen(
            ["node", str(script)],
            cwd=prefix,
            env={**os.environ, **env, "PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            rest = self.process.stdout.read()
            raise AssertionError(f"the crossws server did not start:\n{line}{rest}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def close(self) -> str:
        """Stop the server; return what it printed."""
        self.process.terminate()
        try:
            output, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return output or ""
