"""What every ``crucible`` command shares: options, error handling, exit codes, output.

Exit codes: 0 done, 1 a check failed (corrupt blob, alias conflict, failed gate), 2 bad usage or
input (bad spec, unknown ref, bad key).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import traceback
from typing import Any, Callable, Optional

import typer
from rich.console import Console

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80-column fallback.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# Options shared by many commands.
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of the summary.")
SetOpt = typer.Option(None, "--set", metavar="dotted.key=VALUE",
                      help="Override a spec key (VALUE is YAML); repeatable, validated like the file.")
ProfileOpt = typer.Option(None, "--profile", metavar="NAME",
                          help="Use the spec's profile NAME (its `profiles:` section) instead of its default "
                               "`profile:`; applied before --set. Same as --set profile=NAME.")
RegistryOpt = typer.Option(None, "--registry", metavar="URI", envvar="CRUCIBLE_REGISTRY",
                           help="file://DIR or s3://bucket/prefix (default: $CRUCIBLE_REGISTRY, "
                                "else file://.crucible/registry).")


def command(fn: Callable) -> Callable:
    """Map library errors to messages and exit codes, the same way for every command.

    Stage code raises ``CheckFailed`` for "ran fine, but the verdict is no" (exit 1) and
    ``ValueError``/``SpecError``/``RefError`` for bad input (exit 2). With ``--json`` the command
    runs with stdout sent to stderr (see ``json_stdout``) and the wrapper prints its one result,
    or its error, as the only thing on stdout.
    """

    sig = inspect.signature(fn)
    takes_profile = "set_" in sig.parameters and "profile" not in sig.parameters

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if takes_profile:  # --profile NAME travels with the overrides, so every stage (and a submitted job) sees it
            profile = kwargs.pop("profile", None)
            if profile is not None:
                kwargs["set_"] = [f"profile={profile}", *(kwargs.get("set_") or [])]
        if not kwargs.get("as_json", False):
            return _mapped(fn, args, kwargs, False)
        code = EXIT_OK
        with json_stdout() as results:
            try:
                _mapped(fn, args, kwargs, True)
            except typer.Exit as e:
                code = e.exit_code
            except Exception as e:  # a bug, not bad input: the traceback on stderr, still one JSON object
                traceback.print_exc()
                results[:] = [{"error": f"{type(e).__name__}: {e}", "details": []}]
                code = EXIT_CHECK_FAILED
            if not results:
                results.append({"error": f"{fn.__name__} printed no result", "details": []})
                code = code or EXIT_CHECK_FAILED
        if code:
            raise typer.Exit(code)

    if takes_profile:  # every command that reads a spec (it takes --set) also takes --profile
        params = list(sig.parameters.values())
        at = params.index(sig.parameters["set_"]) + 1
        params.insert(at, inspect.Parameter("profile", inspect.Parameter.KEYWORD_ONLY if
                                            params[at - 1].kind == inspect.Parameter.KEYWORD_ONLY else
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=ProfileOpt, annotation=Optional[str]))
        wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def _mapped(fn: Callable, args, kwargs, as_json: bool):
    from infra.registry import AliasConflict, CorruptBlob, RefError
    from infra.store import BadKey, StoreError
    from pipelines.spec import SpecError

    try:
        return fn(*args, **kwargs)
    except SpecError as e:
        _fail(EXIT_BAD_INPUT, f"{e.source}: invalid spec", e.errors, as_json)
    except (RefError, BadKey, FileNotFoundError, NotADirectoryError, ValueError) as e:
        _fail(EXIT_BAD_INPUT, str(e), [], as_json)
    except (CorruptBlob, AliasConflict, CheckFailed) as e:
        _fail(EXIT_CHECK_FAILED, str(e), [], as_json)
    except StoreError as e:
        _fail(EXIT_CHECK_FAILED, str(e), [], as_json)
    except OSError as e:
        if "huggingface.co" not in str(e):  # transformers' "not on the hub" is a bare OSError
            raise
        _fail(EXIT_BAD_INPUT, "a model name was looked up on the Hugging Face hub and not found there: "
              + str(e).splitlines()[0],
              ["a model (--model, model.base, a baseline) that is neither a local folder nor a registry ref "
               "(<kind>-<task>-<stamp>-<hex> or TASK@ALIAS) is a hub name: check its spelling and the registry, "
               "or the network (with HF_HUB_OFFLINE=1 only the local cache is read)"], as_json)


# The results of the --json command in flight (None when none is): ``emit`` and ``_fail`` put
# them here and ``json_stdout`` prints the one at the end.
_results: list[dict] | None = None
# Set by the program entry points (``main``, ``run_standalone``): the command is the process's
# whole life, so stdout stays on stderr after the result is printed (Ray's log thread and its
# shutdown at exit can still write lines then).
_owns_process = False


@contextlib.contextmanager
def json_stdout():
    """Run a block whose only stdout is one JSON object: while it runs, everything written to
    stdout goes to stderr — print, rich, Ray's forwarded worker logs (printed by the driver's log
    thread), and writes to fd 1 from C code or child processes (fd 1 is pointed at fd 2). Yields
    the list the block's result goes in; the last one is printed on the real stdout at the end."""
    global _results
    real = sys.stdout
    real.flush()
    sys.stderr.flush()
    try:
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 (an embedding host): Python-level redirection only
        saved_fd = None
    sys.stdout, _results = sys.stderr, []
    results = _results
    try:
        yield results
    finally:
        _results = None
        sys.stderr.flush()
        text = json.dumps(results[-1], default=str) + "\n" if results else ""
        if _owns_process and saved_fd is not None and real is sys.__stdout__:
            os.write(saved_fd, text.encode())
            os.close(saved_fd)
        else:
            if saved_fd is not None:
                os.dup2(saved_fd, 1)
                os.close(saved_fd)
            sys.stdout = real
            real.write(text)
            real.flush()


def _fail(code: int, message: str, details: list[str], as_json: bool) -> None:
    if as_json:
        doc = {"error": message, "details": details}
        if _results is not None:
            _results[:] = [doc]  # an error after a partial result replaces it: one object, the error
        else:
            print(json.dumps(doc))
    else:
        err.print(f"[bold red]error:[/bold red] {message}", highlight=False)
        for d in details:
            err.print(f"  {d}", highlight=False)
    raise typer.Exit(code)


def emit(result: dict[str, Any], as_json: bool, human: Callable[[], None]) -> None:
    if not as_json:
        human()
    elif _results is None:  # called outside a command wrapper
        print(json.dumps(result, default=str))
    elif _results:
        raise RuntimeError("a --json command emitted two results; it must print exactly one JSON object")
    else:
        _results.append(json.loads(json.dumps(result, default=str)))


def open_registry(uri: str | None):
    from infra.registry import Registry

    return Registry.open(uri)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)




class CheckFailed(Exception):
    """The command ran, and a check it exists to make failed (exit 1)."""


def run_standalone(fn: Callable) -> None:
    """``python -m jobs.<stage> SPEC [...]``: one command as its own program, the way a laptop
    shell or ``ray job submit`` runs a stage. Local-mode env is set before anything imports ray."""
    program_start()
    solo = typer.Typer(add_completion=False, rich_markup_mode="markdown")
    solo.command()(command(fn))
    solo()


def program_start() -> None:
    """What a ``crucible`` process does first: the local-mode env before anything imports ray, and
    --json commands keep stdout for their one object until the process exits."""
    global _owns_process
    from infra.ray_env import prepare_local_env

    prepare_local_env()
    _owns_process = True
