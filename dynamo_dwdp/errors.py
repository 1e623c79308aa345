"""User-facing errors: one clear line naming the field or value, never a traceback.

Raise `UserError` (or a subclass) for anything caused by input: configs, checkpoints, requests,
peers. The CLI prints `error: <message>` and exits with 2; servers turn it into a 4xx/clean failure.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable


class UserError(Exception):
    """Bad input. The message names the file/field/value and what was expected."""


class ConfigError(UserError):
    """A config/graph YAML file is invalid."""


class CheckpointError(UserError):
    """A model directory (config.json, safetensors) is missing, garbled or mismatched."""


class RequestError(UserError):
    """A request is invalid (e.g. prompt longer than the context, bad sampling values)."""


class PeerError(RuntimeError):
    """A peer of the group died or stopped answering; in-flight work on this rank is failed."""


def require_min_ints(obj: Any, fields: tuple[tuple[str, int], ...]) -> None:
    """Each named attribute of obj is an int (not a bool) >= its bound; else a UserError naming the
    command-line flag (`--name-with-dashes`) and the value."""
    for name, low in fields:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")


def run_with_clean_errors(func: Callable[[Any], int | None], args: Any) -> int:
    try:
        rc = func(args)
        return 0 if rc is None else int(rc)
    except (UserError, PeerError) as e:
        if os.environ.get("DWDP_DEBUG"):
            logging.exception("error")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
