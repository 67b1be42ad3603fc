"""A real Ray head for cluster-mode tests: `ray start --head --block` on 127.0.0.1, free ports.

It is stopped by signalling its own process group — never `ray stop`, which would kill every
Ray on the machine (other test sessions included). The start/stop code is shared with
``crucible serve`` (``infra.ray_env.start_local_head`` / ``stop_process_group``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from infra.ray_env import start_local_head, stop_process_group


@contextmanager
def ray_head(temp_dir: Path, num_cpus: int = 2, timeout: float = 90.0):
    """Yields the Jobs API address (http://127.0.0.1:PORT) of a fresh single-node cluster."""
    proc, _gcs, dashboard = start_local_head(temp_dir, num_cpus=num_cpus, dashboard=True, timeout=timeout)
    try:
        yield dashboard
    finally:
        _stop_group(proc)


def _stop_group(proc) -> None:
    stop_process_group(proc.pid, proc)
