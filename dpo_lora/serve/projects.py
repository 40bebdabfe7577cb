"""The `--api-keys` file: each project's API key and its share of the devices, re-read on SIGHUP.

    {"team-a": "KEY-A", "team-b": {"key": "KEY-B", "weight": 3}}

A project's `weight` (default 1) is its share in the queue's turns: the next job is the oldest of
the project holding the fewest devices per unit of weight, so under contention team-b above holds
three devices for each one of team-a's. `DPO_LORA_API_KEY`, if set, is the project `default`
(weight 1). A bad file is one line naming it and the entry; on SIGHUP it changes nothing.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpo_lora.core.errors import UserError

PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_KEY_LENGTH = 16
DEFAULT_PROJECT = "default"  # DPO_LORA_API_KEY's project, and a key-less server's


@dataclass(frozen=True)
class Projects:
    keys: dict[str, str] = field(default_factory=dict)  # API key -> project
    weights: dict[str, float] = field(default_factory=dict)  # project -> its share (absent: 1)

    def describe(self, default_key: str | None) -> str:
        count = len(set(self.keys.values()) | ({DEFAULT_PROJECT} if default_key else set()))
        return f"on ({count} project(s))" if count else "off (loopback)"


def read_projects(path: str, default_key: str | None) -> Projects:
    """The projects of the --api-keys file at `path`; one line naming the file and the entry for a
    bad name, a key too short to guess at or used twice, or a weight that is not a positive number."""
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--api-keys {path}: file not found") from None
    except (OSError, ValueError) as err:
        raise UserError(f"--api-keys {path}: not a JSON file ({err})") from None
    if not isinstance(entries, dict) or not entries:
        raise UserError(f'--api-keys {path}: expected a JSON object of projects and their keys, {{"team-a": "KEY"}}')
    keys, weights = {}, {}
    for project, entry in entries.items():
        where = f"--api-keys {path}: project {project!r}"
        if not PROJECT_NAME.fullmatch(project):
            raise UserError(f"{where}: names are 1-64 letters, digits, '_', '.', '-'")
        key, weight = _key_and_weight(entry, where)
        if key in keys or key == default_key:
            raise UserError(f"{where}: its key is another project's too")
        if project == DEFAULT_PROJECT and default_key:
            raise UserError(f"{where} is DPO_LORA_API_KEY's; name it in one place")
        keys[key], weights[project] = project, weight
    return Projects(keys, weights)


def _key_and_weight(entry, where: str) -> tuple[str, float]:
    if isinstance(entry, dict):
        if unknown := sorted(set(entry) - {"key", "weight"}):
            raise UserError(f"{where}: unknown field {unknown[0]!r} (an entry holds key and weight)")
        key, weight = entry.get("key"), entry.get("weight", 1)
    else:
        key, weight = entry, 1
    if not isinstance(key, str) or len(key.strip()) < MIN_KEY_LENGTH or key != key.strip():
        raise UserError(f"{where}: its key must be a string of at least {MIN_KEY_LENGTH} characters, no outer spaces")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (math.isfinite(weight) and weight > 0):
        raise UserError(f"{where}: weight must be a number > 0, got {weight!r}")
    return key, float(weight)


def reloader(state, path: str | None):
    """SIGHUP's handler: re-read --api-keys (add, remove or rotate keys, change weights; running jobs,
    loaded models and open streams stay). A bad file changes nothing and says why in one line."""

    def reload(_signum, _frame) -> None:
        if path is None:
            print("dpo-lora serve: SIGHUP: no --api-keys file to reload", file=sys.stderr, flush=True)
            return
        try:
            projects = read_projects(path, state.api_key)
        except UserError as err:
            print(f"dpo-lora serve: SIGHUP: the keys stay as they were: {err}", file=sys.stderr, flush=True)
            return
        state.projects = projects  # one assignment: a request reads the old keys or the new, never a mix
        print(f"dpo-lora serve: SIGHUP: {path} reloaded, auth {projects.describe(state.api_key)}", flush=True)

    return reload
