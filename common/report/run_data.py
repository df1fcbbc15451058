"""What a run directory holds, read tolerantly: the report's one view of a run.

Why tolerant: a report is most needed when a run went wrong. A crashed run may have no ``final``,
a run killed in round 1 no ``summary.json`` at all, a run with ``render.when = "off"`` no images.
Every file that cannot be read becomes one line in :attr:`RunData.problems` (naming the file and the
reason) and the report shows what is there; nothing here raises for a damaged run directory, except
when the directory itself does not exist.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import FedA2VError

log = logging.getLogger(__name__)

LOSS_KEYS = ("train_loss", "train_loss_clip", "train_loss_t5")
EVAL_LOSS_KEYS = ("val_loss", "test_loss")
GENERATOR_KEYS = ("gen_fd_ratio", "gen_precision", "gen_recall", "gen_density", "gen_coverage")
IMAGE_ACC_PREFIX = "image_acc"
STEP_SECONDS_PREFIX = "step_seconds_"  # round metrics: the seconds of each server pipeline step


def server_step_seconds(round_entry: dict[str, Any]) -> float:
    """The server's own seconds in one ``summary.json`` round: the sum of its pipeline steps."""
    metrics = round_entry.get("train", {}).get("global", {})
    return float(sum(v for k, v in metrics.items() if k.startswith(STEP_SECONDS_PREFIX)))


def server_seconds_per_round(summary: dict[str, Any]) -> float:
    """The mean of :func:`server_step_seconds` over a summary's rounds."""
    rounds = summary.get("rounds", [])
    return round(sum(server_step_seconds(r) for r in rounds) / max(1, len(rounds)), 2)


class ReportError(FedA2VError):
    """The run directory cannot be reported on at all (it does not exist)."""


@dataclass
class Checkpoint:
    """One written artifact: path relative to the run directory, size, round from its metadata."""

    path: str
    bytes: int
    round: int | None = None
    kind: str = ""


@dataclass
class ContactSheet:
    owner: str
    path: Path
    classes: list[str]
    round: int | None = None


@dataclass
class RunData:
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    manifest: list[dict[str, Any]] = field(default_factory=list)
    images_dir: Path | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunData":
        run_dir = Path(run_dir).expanduser()
        if not run_dir.is_dir():
            raise ReportError(f"run directory '{run_dir}' does not exist")
        data = cls(run_dir=run_dir)
        data.summary = data._json("summary.json")
        data.config = data._json("config.json")
        data.images_dir = data._find_images_dir()
        if data.images_dir is not None:  # one manifest, or one per round with render.when = "every"
            for path in sorted(data.images_dir.rglob("manifest.jsonl")):
                rel = path.parent.relative_to(data.images_dir)
                for entry in data._manifest(path):
                    if rel.parts and "path" in entry:
                        entry["path"] = str(rel / str(entry["path"]))
                    data.manifest.append(entry)
        return data

    # ------------------------------------------------------------------ reading
    def _json(self, name: str) -> dict[str, Any]:
        path = self.run_dir / name
        if not path.is_file():
            self.problems.append(f"{name}: missing")
            return {}
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            self.problems.append(f"{name}: unreadable ({type(err).__name__}: {err})")
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{name}: not a JSON object")
            return {}
        return value

    def _find_images_dir(self) -> Path | None:
        """``<run>/images``, else the configured ``render.output-dir`` when it holds a manifest."""
        candidates = [self.run_dir / "images"]
        configured = (self.config.get("render") or {}).get("output-dir") or ""
        if configured:
            candidates.append(Path(configured).expanduser())
        for path in candidates:
            if (path / "manifest.jsonl").is_file() or path.is_dir():
                return path
        return None

    def _manifest(self, path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        entries, bad = [], 0
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        if bad:
            self.problems.append(f"{path.name}: {bad} unreadable line(s) skipped")
        return entries

    # ------------------------------------------------------------------ views
    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def run_info(self) -> dict[str, Any]:
        return self.summary.get("run", {}) or {}

    @property
    def status(self) -> str:
        status = self.run_info.get("status")
        if status:
            return str(status)
        return "no summary" if not self.summary else "running or killed"

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return sorted((r for r in self.summary.get("rounds", []) if isinstance(r, dict) and "round" in r),
                      key=lambda r: r["round"])

    @property
    def nodes(self) -> list[str]:
        """Every node id seen in any round (train or evaluate), numerically sorted."""
        seen: set[str] = set()
        for entry in self.rounds:
            for phase in ("train", "evaluate"):
                seen.update((entry.get(phase) or {}).get("nodes", {}) or {})
        return sorted(seen, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))

    def series(self, phase: str, key: str, node: str | None = None) -> tuple[list[int], list[float]]:
        """``(rounds, values)`` of one metric: the global value, or node ``node``'s."""
        xs, ys = [], []
        for entry in self.rounds:
            section = entry.get(phase) or {}
            metrics = (section.get("nodes") or {}).get(node, {}) if node is not None else section.get("global", {})
            value = (metrics or {}).get(key)
            if isinstance(value, (int, float)):
                xs.append(int(entry["round"]))
                ys.append(float(value))
        return xs, ys

    def participation(self) -> list[dict[str, str]]:
        """Per round and node, for train and evaluate: 'ok', 'rejected: <reason>' or 'absent' (no valid reply)."""
        table = []
        for entry in self.rounds:
            row: dict[str, str] = {"round": str(entry["round"])}
            for node in self.nodes:
                cells = []
                for phase in ("train", "evaluate"):
                    section = entry.get(phase) or {}
                    if node in (section.get("nodes") or {}):
                        cells.append(f"{phase} ok")
                        continue
                    reason = _failure_reason(section, node)
                    cells.append(f"{phase} {reason}" if reason else f"{phase} absent")
                row[node] = ", ".join(cells)
            table.append(row)
        return table

    def failures(self) -> list[tuple[int, str, str]]:
        """(round, phase, text) for every failure or rejection the summary recorded."""
        out = []
        for entry in self.rounds:
            for phase in ("train", "evaluate"):
                section = entry.get(phase) or {}
                for kind in ("failures", "rejected"):
                    for item in section.get(kind, []) or []:
                        out.append((int(entry["round"]), phase, _describe(item, kind)))
        return out

    def server_training(self) -> dict[str, dict[str, list[tuple[int, int, float]]]]:
        """``{step: {loss: [(round, epoch, value), ...]}}`` from every round's ``server_training``."""
        out: dict[str, dict[str, list[tuple[int, int, float]]]] = {}
        for entry in self.rounds:
            for step, history in (entry.get("server_training") or {}).items():
                if not isinstance(history, dict):
                    continue
                for loss, values in history.items():
                    if isinstance(values, list):
                        target = out.setdefault(step, {}).setdefault(loss, [])
                        target.extend((int(entry["round"]), i + 1, float(v)) for i, v in enumerate(values)
                                      if isinstance(v, (int, float)))
        return out

    def generator_quality(self) -> list[dict[str, Any]]:
        """The latest round's generator quality per node: pooled (``gen_*``) and per class (``gen_class_*``)."""
        for entry in reversed(self.rounds):
            nodes = (entry.get("train") or {}).get("nodes") or {}
            rows = []
            for node, metrics in sorted(nodes.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
                pooled = {k[4:]: v for k, v in metrics.items() if k in GENERATOR_KEYS}
                if not pooled:
                    continue
                rows.append({"node": node, "round": entry["round"], "class": "all", **pooled})
                per_class: dict[str, dict[str, float]] = {}
                for key, value in metrics.items():
                    if key.startswith("gen_class_"):
                        cls, _, name = key[len("gen_class_"):].rpartition(":")
                        per_class.setdefault(cls, {})[name] = value
                rows.extend({"node": node, "round": entry["round"], "class": c, **v} for c, v in sorted(per_class.items()))
            if rows:
                return rows
        return []

    def image_accuracy(self) -> list[dict[str, Any]]:
        """Image accuracy (from the evaluate metrics) per owner of the latest round that has it."""
        for entry in reversed(self.rounds):
            rows = []
            section = entry.get("evaluate") or {}
            for node, metrics in sorted((section.get("nodes") or {}).items()):
                if IMAGE_ACC_PREFIX in metrics:
                    rows.append({"owner": f"node_{node}", **_image_fields(metrics, "")})
            render = entry.get("render") or {}
            if f"server_{IMAGE_ACC_PREFIX}" in render:
                rows.append({"owner": "server", **_image_fields(render, "server_")})
            if rows:
                return rows
        return []

    def cache_rows(self) -> list[dict[str, Any]]:
        """Per round and node: embedding cache hits, misses, extraction and load seconds."""
        rows = []
        for entry in self.rounds:
            for node, m in sorted(((entry.get("train") or {}).get("nodes") or {}).items()):
                if "cache_hits" in m or "cache_misses" in m:
                    rows.append({"round": entry["round"], "node": node, "hits": int(m.get("cache_hits", 0)),
                                 "misses": int(m.get("cache_misses", 0)),
                                 "extract_s": float(m.get("extract_seconds", 0.0)),
                                 "load_s": float(m.get("load_seconds", 0.0))})
        return rows

    def checkpoints(self) -> list[Checkpoint]:
        """Every safetensors file under the run directory, with the round its metadata names."""
        from safetensors import safe_open

        out = []
        for path in sorted(self.run_dir.rglob("*.safetensors")):
            if self.images_dir is not None and self.images_dir in path.parents:
                continue
            meta: dict[str, str] = {}
            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
            except Exception as err:  # a truncated file is exactly what a report should show
                self.problems.append(f"{path.relative_to(self.run_dir)}: unreadable ({type(err).__name__})")
            rnd, kind = _meta_value(meta, "round"), _meta_value(meta, "type")
            out.append(Checkpoint(str(path.relative_to(self.run_dir)), path.stat().st_size,
                                  int(rnd) if isinstance(rnd, int) or str(rnd).isdigit() else None, str(kind or "")))
        return out

    def contact_sheets(self) -> list[ContactSheet]:
        """One sheet per owner (and round, when rendered every round), with its rows' class names."""
        if self.images_dir is None:
            return []
        sheets = []
        for path in sorted(self.images_dir.rglob("contact_sheet.png")):
            rel = path.parent.relative_to(self.images_dir)
            owner = rel.name
            rnd = _round_of(rel)
            prefix = str(rel) + "/"
            classes: list[str] = []
            for entry in self.manifest:
                if str(entry.get("path", "")).startswith(prefix) and entry.get("class_name") not in classes:
                    classes.append(entry.get("class_name"))
            sheets.append(ContactSheet(owner, path, sorted(classes), rnd))
        return sheets


def _meta_value(meta: dict[str, str], key: str) -> Any:
    """A checkpoint metadata value: the project writes JSON-encoded values, other tools plain strings."""
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _round_of(rel: Path) -> int | None:
    for part in rel.parts:
        if part.startswith("round_") and part[6:].isdigit():
            return int(part[6:])
    return None


def _failure_reason(section: dict[str, Any], node: str) -> str:
    """'rejected: <reason>' when a rejection names this partition (error replies name Flower node ids only)."""
    for item in section.get("rejected", []) or []:
        if f"(partition {node})" in str(item):
            return "rejected: " + str(item).split("): ", 1)[-1]
    return ""


def _describe(item: Any, kind: str) -> str:
    return f"{'failed' if kind == 'failures' else 'rejected'}: {item}"


def _image_fields(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``image_acc``, ``image_acc_oracle`` and per-class ``image_acc:<class>`` of one owner."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.startswith(prefix + IMAGE_ACC_PREFIX):
            out[key[len(prefix):]] = value
    return out
