"""The config directory source: the YAML a user would ``kubectl apply``, read from files.

Every ``*.yaml``, ``*.yml`` and ``*.json`` file under the directory is read when sds starts and
again whenever it changes (``watchfiles``, plus a slow rescan in case an event is missed).
Documents are validated against the Gateway API CRD schemas and defaulted as an API server
would, then parsed into typed objects and handed to the registry as one config.

A file is all or nothing: when it does not parse, or one of its documents is invalid, what it
said before stays served (nothing, if it never was valid), and the problem is logged with the
file name and the path of the field, and shown by ``/readyz`` and ``/debug/config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchfiles
import yaml

from sds.gatewayapi import schema
from sds.gatewayapi.model import ConfigObject, GatewayConfig, ObjectKey, parse
from sds.registry import Registry

log = logging.getLogger("sds.config")

SOURCE_NAME = "config"
SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_FILES = 10_000
MAX_DOCUMENTS = 100_000
# How often the directory is listed again, whatever the file events said.
RESCAN_INTERVAL = 5.0
# File events closer than this are read as one change.
DEBOUNCE_MS = 10

try:
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """Why (part of) a file is not served: the file, the field's path, the message."""

    file: str
    path: str
    message: str

    def as_json(self) -> dict[str, str]:
        """The problem as ``/debug/config`` and ``/readyz`` show it."""
        return {"file": self.file, "path": self.path, "message": self.message}


@dataclass(slots=True)
class _File:
    """What one file last said: its stat, the objects of its last good read, its problems."""

    stat: tuple[int, int]
    objects: list[ConfigObject] = field(default_factory=list)
    problems: list[ConfigProblem] = field(default_factory=list)


def read_documents(text: bytes, name: str) -> tuple[list[dict[str, Any]], list[ConfigProblem]]:
    """The validated, defaulted documents of one file, or the problems that refuse it."""
    try:
        decoded = text.decode("utf-8")
        documents = [d for d in yaml.load_all(decoded, Loader=_Loader) if d is not None]
    except UnicodeDecodeError as exc:
        return [], [ConfigProblem(name, "", f"not UTF-8 (byte {exc.start})")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        return [], [ConfigProblem(name, where, f"does not parse: {str(problem)[:200]}")]
    except RecursionError:
        return [], [ConfigProblem(name, "", "does not parse: nested too deeply")]
    problems: list[ConfigProblem] = []
    valid: list[dict[str, Any]] = []
    for number, document in enumerate(documents):
        if not isinstance(document, dict):
            problems.append(ConfigProblem(name, f"document {number}", "not a mapping"))
            continue
        defaulted, errors = schema.admit(document)
        if defaulted is None:
            label = _label(document, number)
            problems.extend(ConfigProblem(name, f"{label}: {e.path}", e.message) for e in errors)
            continue
        valid.append(defaulted)
    return valid, problems


def _label(document: dict[str, Any], number: int) -> str:
    kind = document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if isinstance(kind, str) and isinstance(name, str):
        return f"{kind[:40]} {name[:80]!r}"
    return f"document {number}"


def _keep_identity(objects: list[ConfigObject], previous: list[ConfigObject]) -> list[ConfigObject]:
    """``objects``, where one equals what the file said before, as that same object.

    Downstream compares by identity first: an edit to one route of a file of fifty then
    rebinds and rebuilds one route, not fifty.
    """
    before = {obj.meta.key: obj for obj in previous}
    kept = []
    for obj in objects:
        old = before.get(obj.meta.key)
        kept.append(old if old is not None and old == obj else obj)
    return kept


def _merge(files: dict[str, _File]) -> tuple[list[ConfigProblem], GatewayConfig]:
    """One config from every file; an object defined twice is the first file's."""
    objects: dict[ObjectKey, ConfigObject] = {}
    owner: dict[ObjectKey, str] = {}
    conflicts = []
    for name in sorted(files):
        for obj in files[name].objects:
            key = obj.meta.key
            if key in objects:
                message = f"also defined in {owner[key]}; that one is served"
                conflicts.append(ConfigProblem(name, str(key), message))
                continue
            objects[key] = obj
            owner[key] = name
    return conflicts, GatewayConfig(objects)


class ConfigDirSource:
    """Feeds the registry with the Gateway API documents of one directory."""

    def __init__(
        self,
        registry: Registry,
        directory: Path,
        *,
        default_namespace: str = "default",
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> None:
        self._registry = registry
        self.directory = directory
        self._default_namespace = default_namespace
        self._rescan_interval = rescan_interval
        self._files: dict[str, _File] = {}
        self.conflicts: list[ConfigProblem] = []
        self.loads = 0  # how many times the directory was read
        self._lock = asyncio.Lock()

    @property
    def problems(self) -> list[ConfigProblem]:
        """Every problem of the last read, in file order."""
        found = [p for name in sorted(self._files) for p in self._files[name].problems]
        return found + self.conflicts

    def _paths(self) -> Iterator[Path]:
        count = 0
        for root, dirs, files in os.walk(self.directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.endswith(SUFFIXES) and not name.startswith("."):
                    count += 1
                    if count > MAX_FILES:
                        return
                    yield Path(root) / name

    def load(self) -> tuple[dict[str, _File], list[ConfigProblem], GatewayConfig]:
        """Read what changed on disk: the files, conflicts and config (runs in a thread)."""
        files = dict(self._files)
        seen: set[str] = set()
        for path in self._paths():
            name = str(path.relative_to(self.directory))
            seen.add(name)
            try:
                info = path.stat()
            except OSError:
                continue
            stat = (info.st_mtime_ns, info.st_size)
            known = files.get(name)
            if known is not None and known.stat == stat:
                continue
            files[name] = self._read(path, name, stat, known)
        for gone in set(files) - seen:
            del files[gone]
        return (files, *_merge(files))

    def _read(self, path: Path, name: str, stat: tuple[int, int], known: _File | None) -> _File:
        previous = known.objects if known is not None else []
        if stat[1] > MAX_FILE_BYTES:
            problem = ConfigProblem(name, "", f"larger than {MAX_FILE_BYTES} bytes")
            return _File(stat, previous, [problem])
        try:
            text = path.read_bytes()
        except OSError as exc:
            return _File(stat, previous, [ConfigProblem(name, "", f"unreadable: {exc.strerror}")])
        try:
            documents, problems = read_documents(text, name)
            objects = [] if problems else [parse(d, self._default_namespace) for d in documents]
            objects = _keep_identity(objects, previous)
        except Exception:  # a bug in a check must not stop the source; the file is refused
            log.exception("config file could not be checked", extra={"file": name})
            return _File(stat, previous, [ConfigProblem(name, "", "could not be checked")])
        if len(documents) > MAX_DOCUMENTS:
            problems.append(ConfigProblem(name, "", f"more than {MAX_DOCUMENTS} documents"))
        if problems:
            for problem in problems:
                log.warning(
                    "config file refused; what it said before stays",
                    extra={"file": name, "path": problem.path, "error": problem.message},
                )
            return _File(stat, previous, problems)
        log.info("config file read", extra={"file": name, "objects": len(objects)})
        return _File(stat, objects)

    async def _reload(self) -> None:
        async with self._lock:
            files, conflicts, config = await asyncio.to_thread(self.load)
            self._files, self.conflicts = files, conflicts
            self.loads += 1
        changed = self._registry.set_config(SOURCE_NAME, config)
        problems = self.problems
        if problems:
            first = problems[0]
            reason = (
                f"{len(problems)} problem(s) in the config directory (see /debug/config),"
                f" first: {first.file}: {first.path}: {first.message}"
            )
            self._registry.set_source_status(SOURCE_NAME, ready=True, reason=reason[:500])
        elif self.loads > 1:
            self._registry.set_source_status(SOURCE_NAME, ready=True)
        if changed:
            log.info("config changed", extra={"objects": len(changed)})

    async def run(self) -> None:
        """Read the directory, then follow its changes until cancelled."""
        self._registry.set_source_status(
            SOURCE_NAME, ready=False, reason="reading the config directory"
        )
        await self._reload()
        self._registry.set_source_status(SOURCE_NAME, ready=True)
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._follow(stop), name="config-dir-events")
        try:
            while True:
                await asyncio.sleep(self._rescan_interval)
                await self._reload()
        finally:
            stop.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _follow(self, stop: asyncio.Event) -> None:
        """Reload on every burst of file events (the rescan covers what they miss)."""
        while not stop.is_set():
            try:
                async for _ in watchfiles.awatch(
                    self.directory,
                    debounce=DEBOUNCE_MS,
                    step=5,
                    stop_event=stop,
                    rust_timeout=int(self._rescan_interval * 1000),
                    yield_on_timeout=False,
                ):
                    await self._reload()
            except (OSError, RuntimeError) as exc:
                log.warning("config directory not watched; rescanning", extra={"error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._rescan_interval)
