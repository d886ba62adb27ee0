"""Model lifecycle, durable and shared: one ``model_lifecycle`` row per model id in the jobs
database (jobs_db.py's table; SQLite or PostgreSQL), so every server on that database sees the
same deprecations and withdrawals. A server without fine-tuning keeps the same table in a
SQLite file of its own (`lifecycle_db_url`).

States, as La Plateforme's model cards carry them: *active* (no row, or a row without
deprecation / withdrawal), *deprecated* (``deprecation`` date and an optional replacement: the
model still answers, with ``Deprecation``/``Sunset`` headers), *withdrawn* (requests are refused
with the replacement named, or served by it when fallback is on), *deleted* (a fine-tuned
model: never served again). ``archived``, ``name`` and ``description`` are a fine-tuned model's
card fields. Each change is one short write transaction returning the row before and after
(the caller audits ``old -> new``).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from souverain.errors import SouverainError
from souverain.finetune.jobs_db import lifecycle_t, open_engine, safe_url
from souverain.finetune.store import Transactions
from souverain.paths import data_home
from souverain.sqldb import create_schema

ACTIONS = ("deprecate", "withdraw", "restore")


class LifecycleError(SouverainError):
    """A lifecycle change that cannot be made (the message says why and the fix)."""


@dataclass(frozen=True)
class Lifecycle:
    """One model's lifecycle row (defaults = an active model without a row)."""

    model_id: str
    deprecation: str | None = None  # YYYY-MM-DD
    deprecated_at: float | None = None
    replacement: str | None = None
    withdrawn_at: float | None = None
    fallback: bool | None = None
    archived: bool = False
    name: str | None = None
    description: str | None = None
    deleted_at: float | None = None
    modified_at: float = 0.0
    modified_by: str | None = None

    @property
    def state(self) -> str:
        if self.deleted_at is not None:
            return "deleted"
        if self.withdrawn_at is not None:
            return "withdrawn"
        if self.deprecation is not None or self.deprecated_at is not None:
            return "deprecated"
        return "active"

    def summary(self) -> dict[str, Any]:
        """What the audit log keeps of a state (old -> new)."""
        out: dict[str, Any] = {"state": self.state}
        for k in ("deprecation", "replacement", "archived", "name", "description"):
            v = getattr(self, k)
            if v not in (None, False):
                out[k] = v
        return out


def lifecycle_db_url(root: Path | None = None) -> str:
    """The lifecycle's own SQLite file when the server has no jobs database (--no-finetune)."""
    return f"sqlite:///{(root or data_home()) / 'lifecycle.db'}"


def parse_date(text: str) -> str:
    """A ``YYYY-MM-DD`` date, checked (LifecycleError naming the expected form)."""
    try:
        return dt.date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise LifecycleError(f"The date {text!r} is not a calendar date; give it as "
                             "YYYY-MM-DD, e.g. 2027-06-30.") from None


class LifecycleStore(Transactions):
    """The ``model_lifecycle`` rows: read all (the server caches them), change one."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None,
                 root: Path | None = None):
        self.url = url or lifecycle_db_url(root)
        try:
            self.engine = engine or open_engine(self.url)
            create_schema(self.engine, lifecycle_t.metadata, tables=[lifecycle_t])
        except (sa.exc.SQLAlchemyError, OSError, ImportError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise LifecycleError(f"Cannot open the model lifecycle database "
                                 f"{safe_url(self.url)}: {reason}.") from None
        self._owned = engine is None

    def close(self) -> None:
        if self._owned:
            self.engine.dispose()

    def all(self) -> dict[str, Lifecycle]:
        with self.read() as c:
            rows = c.execute(lifecycle_t.select()).mappings().all()
        return {r["model_id"]: Lifecycle(**r) for r in rows}

    def get(self, model_id: str) -> Lifecycle:
        with self.read() as c:
            row = c.execute(lifecycle_t.select().where(lifecycle_t.c.model_id == model_id)
                            ).mappings().first()
        return Lifecycle(**row) if row is not None else Lifecycle(model_id)

    def change(self, model_id: str, by: str | None, **values: Any) -> tuple[Lifecycle, Lifecycle]:
        """Set ``values`` on ``model_id``'s row (created if missing); (old, new)."""
        with self.write() as c:
            row = c.execute(lifecycle_t.select().where(lifecycle_t.c.model_id == model_id)
                            ).mappings().first()
            old = Lifecycle(**row) if row is not None else Lifecycle(model_id)
            new = Lifecycle(**{**asdict(old), **values, "modified_at": time.time(),
                               "modified_by": by})
            fields = {k: v for k, v in asdict(new).items() if k != "model_id"}
            if row is None:
                c.execute(lifecycle_t.insert().values(model_id=model_id, **fields))
            else:
                c.execute(lifecycle_t.update().where(lifecycle_t.c.model_id == model_id)
                          .values(**fields))
        return old, new

    def apply(self, action: str, model_id: str, by: str | None, *,
              replacement: str | None = None, date: str | None = None,
              fallback: bool | None = None) -> tuple[Lifecycle, Lifecycle]:
        """``deprecate`` (date, replacement), ``withdraw`` (replacement), or ``restore``
        (active again: deprecation and withdrawal cleared)."""
        if action not in ACTIONS:
            raise LifecycleError(f"Unknown lifecycle action {action!r}; use one of "
                                 f"{', '.join(ACTIONS)}.")
        if replacement is not None and replacement == model_id:
            raise LifecycleError(f"{model_id} cannot replace itself; give another model as "
                                 "the replacement.")
        if self.get(model_id).deleted_at is not None:
            raise LifecycleError(f"{model_id} was deleted; a deleted model cannot change "
                                 "state.")
        now = time.time()
        if action == "restore":
            return self.change(model_id, by, deprecation=None, deprecated_at=None,
                               replacement=None, withdrawn_at=None, fallback=None)
        values: dict[str, Any] = {}
        if replacement is not None:
            values["replacement"] = replacement
        if fallback is not None:
            values["fallback"] = fallback
        if date is not None:
            values["deprecation"] = parse_date(date)
        if action == "deprecate":
            current = self.get(model_id)
            values["deprecated_at"] = current.deprecated_at or now
            values["withdrawn_at"] = None
            if "deprecation" not in values and current.deprecation is None:
                raise LifecycleError(f"Say when {model_id} will be retired: --date YYYY-MM-DD "
                                     "(the card's deprecation date).")
        else:
            values["withdrawn_at"] = now
            if "deprecation" not in values and self.get(model_id).deprecation is None:
                values["deprecation"] = dt.datetime.fromtimestamp(
                    now, dt.timezone.utc).date().isoformat()
        return self.change(model_id, by, **values)
