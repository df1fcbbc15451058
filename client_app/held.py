"""What a node keeps of the server's records between messages, so the server may send them by reference.

The class targets never change during a run, and the global weights of a round's evaluate message
are the next round's train weights: a node stores each such record (:data:`common.wire.HELD_RECORDS`)
when it arrives in full, under the hash the server declared for it, and names what it holds in
every reply (``held``). A message that carries only a hash (``by-reference``) is completed here from
what the node holds. The held records are part of the node's carried state (:mod:`client_app.node_state`),
so a restarted SuperNode still has them (of this run only: :mod:`client_app.node_state`). A node that
holds nothing under that hash raises :class:`~common.wire.HeldRecordMissing`; the ClientApp then
answers with :func:`missing_reply` instead of doing the work, and the server sends the same message
again in full within the same phase (:mod:`server_app.holdings`), so the round never loses the node.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from common.records import HELD_MISSING
from common.wire import BY_REFERENCE, HASHES, HELD, HELD_RECORDS, HeldRecordMissing

PREFIX = "held-"


def state_keys() -> tuple[str, ...]:
    """The Context.state keys of the held records (ArrayRecords, each with a ``-meta`` ConfigRecord)."""
    return tuple(f"{PREFIX}{name}" for name in HELD_RECORDS)


def _hash_of(state: RecordDict, name: str) -> str:
    meta = state.get(f"{PREFIX}{name}-meta")
    return str(meta.get("hash", "")) if meta is not None else ""  # type: ignore[union-attr]


def by_reference(content: RecordDict) -> bool:
    """Whether a message leaves records out for the node to fill in from what it holds."""
    return BY_REFERENCE in content


def resolve(content: RecordDict, state: RecordDict) -> tuple[RecordDict, list[str]]:
    """``content`` with every record sent by reference filled in from ``state``, and the state keys of the
    records that came in full (with a declared hash) and were kept, replacing the earlier ones. The
    message is not changed."""
    declared = dict(content[HASHES]) if HASHES in content else {}  # type: ignore[arg-type]
    refs = dict(content[BY_REFERENCE]) if BY_REFERENCE in content else {}  # type: ignore[arg-type]
    out = RecordDict(dict(content.items()))
    kept: list[str] = []
    for name, (array_key, meta_key) in HELD_RECORDS.items():
        if name in refs:
            want = str(refs[name])
            if _hash_of(state, name) != want or f"{PREFIX}{name}" not in state:  # the hash alone is not the record
                have = _hash_of(state, name) or "nothing"
                raise HeldRecordMissing(
                    f"the server sent '{name}' by reference ({want[:12]}) but this node holds {have[:12]} "
                    "(its state was lost); it asks for the message in full")
            out[array_key] = state[f"{PREFIX}{name}"]
            meta = json.loads(str(state[f"{PREFIX}{name}-meta"]["record"]))  # type: ignore[index]
            out[meta_key] = ConfigRecord(meta)
        elif name in declared and array_key in content:
            state[f"{PREFIX}{name}"] = content[array_key]
            record_meta = dict(content[meta_key]) if meta_key in content else {}  # type: ignore[arg-type]
            state[f"{PREFIX}{name}-meta"] = ConfigRecord({"hash": str(declared[name]),
                                                          "record": json.dumps(record_meta)})
            kept.append(f"{PREFIX}{name}")
    return out, kept


def forget_files(directory: Path) -> int:
    """Remove the held records' files of a run that is over (a resumed run's server sends everything in
    full again: nothing will refer to them); returns how many were removed."""
    removed = 0
    for key in state_keys():
        for path in Path(directory).glob(f"{key}_round_*.safetensors"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def missing_names(content: RecordDict, state: RecordDict) -> list[str]:
    """The records ``content`` sends by reference that ``state`` names under another hash (all of them when
    the hashes agree but a record itself was lost)."""
    record = content[BY_REFERENCE] if BY_REFERENCE in content else ConfigRecord()
    refs = {str(k): str(v) for k, v in record.items()}  # type: ignore[union-attr]
    return sorted(name for name, want in refs.items() if _hash_of(state, name) != want) or sorted(refs)


def missing_reply(content: RecordDict, state: RecordDict, reason: str) -> RecordDict:
    """The reply of a node that lacks records sent by reference: which ones (``held-missing``). Why a reply
    and not an error: the server recognises it without parsing an error text and sends the message again
    in full within the phase (an error would cost the node the round)."""
    return RecordDict({HELD_MISSING: ConfigRecord({"records": missing_names(content, state), "reason": reason})})


def held(state: RecordDict) -> ConfigRecord:
    """The ``held`` record of a reply: ``{name: hash}`` of what this node holds now."""
    return ConfigRecord({name: _hash_of(state, name) for name in HELD_RECORDS if _hash_of(state, name)})


__all__ = ["HELD", "HeldRecordMissing", "by_reference", "forget_files", "held", "missing_reply", "resolve",
           "state_keys"]
