"""Training progress on the driver's stderr: a rich bar on a terminal, plain lines when piped.

Ray workers have no terminal (their output is forwarded line by line), so rank 0 sends events to
a queue actor and the driver renders them. stdout is left alone: ``--json`` stays one object.

Events are dicts: ``{"kind": "start", "total": N}``, ``{"kind": "step", "step": s, "total": N,
"loss": x, "tokens_per_s": y}`` and ``{"kind": "log", "msg": text}``.
"""

from __future__ import annotations

import sys
import threading


def send(target, event: dict) -> None:
    """From a worker: fire and forget (never blocks a training step); stderr without a driver."""
    if target is None:
        if event.get("kind") == "log":
            print(f"[crucible train] {event['msg']}", file=sys.stderr, flush=True)
        return
    target.actor.put_nowait.remote(event)


class Progress:
    """Owns the queue (``target``, passed to the workers) and the thread that draws from it."""

    def __init__(self, mode: str = "auto", stream=None):
        from ray.util.queue import Queue

        self.stream = stream or sys.stderr
        self.bar = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self.target = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        view = _Bar(self.stream) if self.bar else _Lines(self.stream)
        try:
            while True:
                try:
                    event = self.target.get(timeout=1.0)  # each wait is a call to the queue actor
                except Empty:
                    if self._stop.is_set():
                        return
                    continue
                view.show(event)
        except Exception:  # noqa: BLE001 - the queue actor went away with Ray; progress is best effort
            return
        finally:
            view.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            import ray

            ray.kill(self.target.actor)
        except Exception:  # noqa: BLE001
            pass


class _Lines:
    def __init__(self, stream):
        self.stream = stream

    def show(self, e: dict) -> None:
        if e["kind"] == "log":
            line = e["msg"]
        elif e["kind"] == "step" and e.get("print"):
            line = f"step {e['step']}/{e['total']}  loss {e['loss']:.4f}  {e['tokens_per_s']:,.0f} tok/s"
        else:
            return
        print(f"[crucible train] {line}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, stream):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(file=stream)
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.console, transient=False)
        self.task = None

    def show(self, e: dict) -> None:
        if e["kind"] == "log":
            self.console.print(f"[crucible train] {e['msg']}", highlight=False)
            return
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=e.get("total"), info="")
        if e["kind"] == "step":
            self.progress.update(self.task, completed=e["step"], total=e["total"],
                                 info=f"loss {e['loss']:.4f}  {e['tokens_per_s']:,.0f} tok/s")

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
