"""A real Ray head for cluster-mode tests: `ray start --head --block` on 127.0.0.1, free ports.

It is stopped by signalling its own process group — never `ray stop`, which would kill every
Ray on the machine (other test sessions included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from infra.ray_env import local_ray_env
from tests.s3server import free_port


@contextmanager
def ray_head(temp_dir: Path, num_cpus: int = 2, timeout: float = 90.0):
    """Yields the Jobs API address (http://127.0.0.1:PORT) of a fresh single-node cluster."""
    import httpx

    temp_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **local_ray_env(), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    dash = free_port()
    args = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", "--include-dashboard=true"]
    log = open(temp_dir / "ray-head.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{(temp_dir / 'ray-head.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{address}/api/version", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"Ray head not up after {timeout}s")
            time.sleep(0.5)
        yield address
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(0.5)  # let children that got the signal exit too
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        pass
