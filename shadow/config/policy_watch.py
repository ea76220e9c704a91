"""Hot reload of the policy file: re-read it at each decision point, keep the old policy on a bad edit.

The file is read (at most MAX_CONFIG_BYTES + 1 bytes) and hashed on every poll instead of trusting its
mtime: a policy file is small, polls happen once per decision point, and coarse mtimes on some
filesystems would hide two quick edits. Each change in what the file holds gives exactly one event:
`policy_reloaded` with the changed keys, or `policy_rejected` with the error while the previous
policy stays in force. A file deleted, replaced by rename, half-written by an editor or grown
huge is just another content (or absence) to judge.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from shadow.config.loader import MAX_CONFIG_BYTES, ConfigError, ConfigProblem, flatten, to_dict
from shadow.config.policy import Policy, policy_from_text

# Keys a running job cannot take a new value for, and why. The noise floor and the violation streak
# are measured in the unit of `compare.metric`: a new metric would judge new windows against old counts.
IMMUTABLE_KEYS = {"compare.metric": "the noise floor and the violation streak are measured in its unit"}

_MISSING = "missing"


@dataclass(frozen=True)
class PollResult:
    policy: Policy  # the policy in force after this poll
    event: dict[str, Any] | None  # None when the file holds what it held at the last poll


class PolicyWatcher:
    def __init__(self, path: str | os.PathLike, initial_policy: Policy, overrides: list[str] | None = None):
        """Watch `path`; `initial_policy` is what was loaded from it (with `overrides`, which keep
        applying on every reload: command line > file)."""
        self.path = str(path)
        self.policy = initial_policy
        self._overrides = list(overrides or [])
        self._last_seen = self._fingerprint(self._read()[0])

    def poll(self) -> PollResult:
        content, error = self._read()
        fingerprint = self._fingerprint(content)
        if fingerprint == self._last_seen:
            return PollResult(self.policy, None)
        self._last_seen = fingerprint
        try:
            if error is not None:
                raise ConfigError([error])
            candidate = policy_from_text(content.decode("utf-8"), self.path, self._overrides)
            _check_immutable(self.path, self.policy, candidate)
        except ConfigError as exc:
            return PollResult(self.policy, {"event": "policy_rejected", "path": self.path, "error": str(exc),
                                            "kept_in_force": "the previous policy"})
        changes = diff(self.policy, candidate)
        self.policy = candidate
        return PollResult(candidate, {"event": "policy_reloaded", "path": self.path, "changes": changes})

    def _read(self) -> tuple[bytes | None, ConfigProblem | None]:
        try:
            with open(self.path, "rb") as f:
                content = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            return None, ConfigProblem(self.path, "", None, f"a readable file ({exc.strerror})")
        if len(content) > MAX_CONFIG_BYTES:
            return content, ConfigProblem(self.path, "", f"more than {MAX_CONFIG_BYTES} bytes",
                                          f"a file of at most {MAX_CONFIG_BYTES} bytes")
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as exc:
            return content, ConfigProblem(self.path, "", None, f"a UTF-8 text file ({exc.reason})")
        return content, None

    @staticmethod
    def _fingerprint(content: bytes | None) -> str:
        return _MISSING if content is None else hashlib.sha256(content).hexdigest()


def diff(old: Policy, new: Policy) -> dict[str, dict[str, Any]]:
    """Changed keys, dotted, as {"key": {"old": ..., "new": ...}} (YAML values, enums as strings)."""
    before, after = flatten(to_dict(old)), flatten(to_dict(new))
    return {key: {"old": before[key], "new": after[key]} for key in before if before[key] != after[key]}


def _check_immutable(source: str, current: Policy, candidate: Policy) -> None:
    changed = diff(current, candidate)
    problems = [ConfigProblem(source, key, changed[key]["new"],
                              f"{changed[key]['old']!r} as at the start of the run (cannot change mid-run: {why})")
                for key, why in IMMUTABLE_KEYS.items() if key in changed]
    if problems:
        raise ConfigError(problems)
