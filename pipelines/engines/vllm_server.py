"""vLLM as a managed worker process: its OpenAI server started from a second venv, spoken to over HTTP.

Why a process and not an import: the vLLM CPU build pins transformers <5.20, the stack pins 5.23,
and the two cannot share one venv. vLLM's own OpenAI server (``python -m
vllm.entrypoints.openai.api_server``) already does continuous batching, structured outputs and
multi-LoRA, so the engine only has to start it, wait for it, talk to it through the ``http`` engine
and stop it. Where ``import vllm`` works in this process (GPU installs) the in-process engine in
``pipelines.engines.vllm`` is used instead.

The python that runs the server: ``$CRUCIBLE_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` beside
the project (``make setup-vllm``); ``CRUCIBLE_VLLM_PYTHON=off`` disables it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from pipelines.engines import Chat, Completion, GenParams
from pipelines.engines.vllm import STRUCTURED_OUTPUTS

ROOT = Path(__file__).resolve().parents[2]
# vLLM's CPU attention kernels exist for these head sizes only (vllm/v1/attention/backends/cpu_attn.py)
CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


def vllm_python() -> Path | None:
    """The python of the vLLM venv, or None when there is none (or it is turned off)."""
    env = os.environ.get("CRUCIBLE_VLLM_PYTHON")
    if env is not None:
        if env.strip().lower() in ("", "off", "0", "none"):
            return None
        return Path(env) if Path(env).exists() else None
    p = ROOT / ".venv-vllm" / "bin" / "python"
    return p if p.exists() else None


def cpu_supports(model_dir: str | os.PathLike) -> str | None:
    """None when the CPU build can run this model folder, else the reason it cannot."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        return f"{model_dir} has no config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    if head_dim not in CPU_HEAD_SIZES:
        return f"head size {head_dim}: vLLM's CPU attention supports {sorted(CPU_HEAD_SIZES)}"
    return None


def cpu_threads_env(env: dict, threads: int | None, python: Path) -> dict[str, str]:
    """Environment for the CPU build's compute threads.

    By default vLLM keeps one core for its scheduler process and binds its compute threads to the
    rest: on a 2-core host that is one thread on one core, and two servers (production and canary)
    both land on core 0. Measured here (2 cores, SmolLM2-135M, 40 chats, 32 at once): 1.28 ex/s as
    vLLM sets it, 2.02 with both cores for compute, 2.18 with Intel's OpenMP runtime preloaded as
    vLLM's CPU guide advises. So on hosts of up to 4 cores nothing is reserved; ``threads`` (a
    replica's share) or the user's own ``VLLM_CPU_*`` settings win.
    """
    out: dict[str, str] = {}
    if threads:
        if "VLLM_CPU_OMP_THREADS_BIND" not in env:
            out["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # OMP_NUM_THREADS threads, placed by the OS
    elif len(os.sched_getaffinity(0)) <= 4 and not {"VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"} & set(env):
        out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.exists() and not env.get("LD_PRELOAD"):
        out["LD_PRELOAD"] = str(iomp)
        if "KMP_BLOCKTIME" not in env:
            out["KMP_BLOCKTIME"] = "5"  # idle threads sleep soon: cores are shared
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Stop the server and the engine-core processes it spawned (its whole process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class VLLMServer:
    """One vLLM OpenAI server on 127.0.0.1 serving ``model_dir`` (name ``served_name``) and any LoRA
    adapters of it (``loras``: name -> adapter folder), all sharing the base's weights.

    Use as a context manager or call ``close()``; the process group is also stopped when this
    object is collected or the interpreter exits.
    """

    def __init__(self, model_dir: str | os.PathLike, *, served_name: str = "base", tokenizer: str | None = None,
                 loras: dict[str, str] | None = None, max_lora_rank: int = 64, max_model_len: int = 2048,
                 dtype: str = "auto", kv_cache_gib: float = 1.0, max_num_seqs: int = 64,
                 trust_remote_code: bool = False, threads: int | None = None, python: str | os.PathLike | None = None,
                 startup_timeout_s: float = 900.0, extra_args: tuple[str, ...] = ()):
        py = Path(python) if python else vllm_python()
        if py is None or not py.exists():
            raise FileNotFoundError("vLLM server: no vLLM venv (run `make setup-vllm` or set CRUCIBLE_VLLM_PYTHON)")
        self.served_name = served_name
        self.max_num_seqs = max_num_seqs
        self.loras = dict(loras or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        gpu = _has_cuda()
        if dtype == "auto" and not gpu:
            dtype = "float32"  # what the HF engine uses on CPU: the same numerics on both engines
        cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(max_model_len), "--dtype", dtype, "--seed", "0",
               "--max-num-seqs", str(max_num_seqs), "--disable-log-stats", "--disable-uvicorn-access-log",
               "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS)]
        if tokenizer:
            cmd += ["--tokenizer", str(tokenizer)]
        if trust_remote_code:
            cmd.append("--trust-remote-code")
        if gpu:
            cmd += ["--gpu-memory-utilization", "0.85"]
        else:
            # on the CPU build "gpu memory" is host RAM: reserve a fixed, small KV cache instead of a
            # fraction of a shared machine's memory
            cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
            if "--block-size" not in extra_args:
                # the CPU build's default KV block is 128 tokens, and only whole blocks are reused by
                # prefix caching: with 32, a shared system prompt or few-shot prefix is computed once
                # (a 3-shot, 200-token prompt, 40 chats: 3.40 -> 4.13 examples/s here)
                cmd += ["--block-size", "32"]
        self.max_lora_rank = max_lora_rank if self.loras else 0
        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if self.loras:
            # slots for a production, a canary and a shadow adapter in one batch; adapters of the same base
            # can be added while it runs (load_lora), on this server's 127.0.0.1 port only
            cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max(3, len(self.loras))),
                    "--lora-modules", *[f"{n}={p}" for n, p in self.loras.items()]]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        cmd += list(extra_args)
        env.pop("PYTHONPATH", None)  # the server imports vLLM only, never this project's venv
        # Ray sets OMP_NUM_THREADS to an actor's CPU share (often 1); the server's engine should use the
        # cores unless told otherwise
        env.pop("OMP_NUM_THREADS", None)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if not gpu:
            env.update(cpu_threads_env(env, threads, py))
        self.cmd = cmd
        self._log = tempfile.NamedTemporaryFile(prefix="crucible-vllm-", suffix=".log", delete=False)
        self.log_path = self._log.name
        # A session of its own, so close() can stop the engine-core children with it, led by a small
        # watchdog (_WATCHDOG) so that a killed owner (a Serve replica torn down hard) leaves no orphan
        # behind: vLLM's engine core and workers outlived their server's SIGTERM on this machine.
        self.proc = subprocess.Popen([str(py), "-c", _WATCHDOG, *cmd], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=tempfile.gettempdir(), start_new_session=True)
        self._finalizer = weakref.finalize(self, _stop, self.proc)
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def load_lora(self, name: str, path: str, rank: int) -> str | None:
        """Load one more LoRA adapter of this server's base while it runs; None when loaded, else why not."""
        import httpx

        if not self.loras:
            return "its server was started without LoRA (a full model with no adapter)"
        if name in self.loras:
            return None
        if rank > self.max_lora_rank:
            return f"LoRA rank {rank} is over this server's max_lora_rank {self.max_lora_rank}"
        r = httpx.post(self.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=300)
        if r.status_code != 200:
            return f"vLLM refused the adapter: {r.text[:300]}"
        self.loras[name] = path
        return None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        self._finalizer()  # stops the process group once; later calls do nothing
        self._log.close()

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Leads the server's session: starts the server, and when the server exits or the owner that started it
# is gone (reparented), stops every other process of the session (SIGTERM, then SIGKILL) before it exits
# with the server's status. It ignores SIGTERM so close()'s signal to the group reaches the server first.
_WATCHDOG = """
import os, signal, subprocess, sys, time
owner = os.getppid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = subprocess.Popen(sys.argv[1:], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
while server.poll() is None:
    if os.getppid() != owner:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    time.sleep(0.5)
def others():
    me, group, out = os.getpid(), os.getpgid(0), []
    for d in (os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            if d.isdigit() and int(d) != me and os.getpgid(int(d)) == group:
                out.append(int(d))
        except OSError:
            pass
    return out
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in others():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while others() and time.monotonic() < deadline:
        time.sleep(0.2)
sys.exit(server.returncode if server.returncode >= 0 else 128 - server.returncode)
"""


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class VLLMServerEngine:
    """The ``vllm`` engine over a managed server: ``generate`` sends every chat at once (the server
    batches them continuously) through the ``http`` engine, so both share one request format,
    including constrained decoding (``GenParams.guide`` as ``response_format`` / ``structured_outputs``)."""

    name = "vllm"

    def __init__(self, model: str, registry=None, *, adapter: str | None = None, max_model_len: int = 2048,
                 dtype: str = "auto", trust_remote_code: bool = False, concurrency: int | None = None,
                 merge_adapter: bool = True, stream_interval: int = 8, **server_kwargs):
        from pipelines.engines.http import HTTPEngine
        from pipelines.engines.loading import resolve_model
        from pipelines.modeling import load_tokenizer

        resolved = merged_if_adapter(resolve_model(adapter or model, registry), registry, merge=merge_adapter)
        self.resolved = resolved
        self.default_system_prompt = resolved.system_prompt
        self.default_guide = resolved.guide
        self.tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=trust_remote_code)
        base = resolved.weights_path
        loras = None
        if resolved.adapter:
            server_kwargs["max_lora_rank"] = max(server_kwargs.get("max_lora_rank", 16),
                                                 _lora_rank_bucket(resolved.lora_rank))
            loras = {"adapter": str(resolved.path)}
        self.server = VLLMServer(base, tokenizer=resolved.tokenizer_path, loras=loras, max_model_len=max_model_len,
                                 dtype=dtype, trust_remote_code=trust_remote_code, **server_kwargs)
        # as many requests in flight as the server schedules at once (``max_num_seqs``): fewer leaves
        # a second, small wave at the end of a set (40 rows at 32: 4.3 examples/s; at 64: 5.9)
        self.http = HTTPEngine(self.server.url, "adapter" if loras else self.server.served_name,
                               concurrency=concurrency or self.server.max_num_seqs, retries=1, timeout_s=900.0,
                               stream_interval=stream_interval)

    def render(self, chat: Chat) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def generate(self, chats: list[Chat], params: GenParams = GenParams()) -> list[Completion]:
        return self.http.generate(chats, params)

    def close(self) -> None:
        self.http.close()
        self.server.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def merged_if_adapter(resolved, registry, *, merge: bool = True):
    """A registered LoRA adapter served on its own, as its merge (registered once, then reused).

    vLLM's CPU build decodes a LoRA adapter ~4x slower than plain weights: measured here on
    SmolLM2-135M, the demo's fine-tuned adapter 23-28 completion tokens/s against 100 for its base on
    the same 40 rows. LoRA on this server only pays when several adapters share one base (a
    canary beside production); an adapter given by path (no registry) stays LoRA."""
    if not (merge and resolved.adapter and resolved.ref and registry is not None):
        return resolved
    from pipelines.engines.loading import resolve_model
    from pipelines.export import merge_registered

    return resolve_model(merge_registered(registry, resolved.ref, reuse=True)[0].id, registry)


def _lora_rank_bucket(rank: int) -> int:
    """vLLM accepts max_lora_rank from a fixed set; the smallest that holds ``rank``."""
    for r in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r >= rank:
            return r
    return rank
