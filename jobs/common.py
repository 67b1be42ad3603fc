"""What every ``crucible`` command shares: options, error handling, exit codes, output.

Exit codes: 0 done, 1 a check failed (corrupt blob, alias conflict, failed gate), 2 bad usage or
input (bad spec, unknown ref, bad key).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
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
    ``ValueError``/``SpecError``/``RefError`` for bad input (exit 2).
    """

    sig = inspect.signature(fn)
    takes_profile = "set_" in sig.parameters and "profile" not in sig.parameters

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from infra.registry import AliasConflict, CorruptBlob, RefError
        from infra.store import BadKey, StoreError
        from pipelines.spec import SpecError

        as_json = kwargs.get("as_json", False)
        if takes_profile:  # --profile NAME travels with the overrides, so every stage (and a submitted job) sees it
            profile = kwargs.pop("profile", None)
            if profile is not None:
                kwargs["set_"] = [f"profile={profile}", *(kwargs.get("set_") or [])]
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

    if takes_profile:  # every command that reads a spec (it takes --set) also takes --profile
        params = list(sig.parameters.values())
        at = params.index(sig.parameters["set_"]) + 1
        params.insert(at, inspect.Parameter("profile", inspect.Parameter.KEYWORD_ONLY if
                                            params[at - 1].kind == inspect.Parameter.KEYWORD_ONLY else
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=ProfileOpt, annotation=Optional[str]))
        wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def _fail(code: int, message: str, details: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": message, "details": details}))
    else:
        err.print(f"[bold red]error:[/bold red] {message}", highlight=False)
        for d in details:
            err.print(f"  {d}", highlight=False)
    raise typer.Exit(code)


def emit(result: dict[str, Any], as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        human()


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
    from infra.ray_env import prepare_local_env

    prepare_local_env()
    solo = typer.Typer(add_completion=False, rich_markup_mode="markdown")
    solo.command()(command(fn))
    solo()
