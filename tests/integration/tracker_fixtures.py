"""Real trackers for the tests, offline and on loopback only: a local `mlflow server` (SQLite backend) and a
reader of W&B's offline run files (output_dir/wandb/offline-run-*/run-<id>.wandb)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
SERVER_START_SECONDS = 120
WANDB_BLOCK = 32768          # the .wandb file is a LevelDB-style log: 32 KiB blocks of 7-byte-headed chunks
WANDB_CHUNK_HEADER = 7       # crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)
WANDB_FILE_HEADER = 7        # ":W&B", magic (2), version (1)


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server(directory: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` on a free loopback port with a SQLite store in `directory`: (its URI, its process).
    Its own session, so the whole process group (uvicorn workers) goes at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (directory / "server.log").open("w")
    server = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
         "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("mlflow server did not start:\n" + (directory / "server.log").read_text())
                time.sleep(0.25)
        yield uri, server
    finally:
        stop_server(server)
        log.close()


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
    try:
        os.killpg(server.pid, signal.SIGKILL)   # workers left behind by the server's own shutdown
    except ProcessLookupError:
        pass


def _wandb_chunks(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, pending = WANDB_FILE_HEADER, b""
    while position + WANDB_CHUNK_HEADER <= len(data):
        left_in_block = WANDB_BLOCK - position % WANDB_BLOCK
        if left_in_block < WANDB_CHUNK_HEADER:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + WANDB_CHUNK_HEADER])
        if kind == 0:                 # zero padding to the end of the block
            position += left_in_block
            continue
        chunk = data[position + WANDB_CHUNK_HEADER:position + WANDB_CHUNK_HEADER + length]
        position += WANDB_CHUNK_HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


@dataclass
class WandbOfflineRun:
    """What one offline run file holds."""

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)   # one row per step
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def steps(self, key: str) -> list[int]:
        return [row["_step"] for row in self.history if key in row]


def read_wandb_offline_runs(output_dir: Path) -> list[WandbOfflineRun]:
    """Every offline run under output_dir/wandb, oldest first."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = WandbOfflineRun(path=path)
        for chunk in _wandb_chunks(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.name, run.project = record.run.run_id, record.run.display_name, record.run.project
                run.tags = list(record.run.tags)
                run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                run.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in record.history.item})
            elif kind == "summary":
                run.summary.update({item.key: json.loads(item.value_json) for item in record.summary.update
                                    if item.key})
            elif kind == "artifact":
                run.artifacts.append({"name": record.artifact.name, "type": record.artifact.type,
                                      "refs": [entry.ref for entry in record.artifact.manifest.contents]})
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
        runs.append(run)
    return runs
