"""The SQL side of the fine-tuning jobs: the four tables and the engine that reaches them,
``model_lifecycle`` (one row per model id: deprecation, withdrawal, archive, deletion,
shared by every server on the database; `souverain.finetune.lifecycle`) and ``eval_runs``
(evaluation runs; `souverain.finetune.eval_runs`). A job's release gate lives in its own row
(the ``evaluation*`` columns; `souverain.finetune.release_gate`).

SQLAlchemy Core over ``sqlite:///path`` or ``postgresql+psycopg://...``. `JobStore` (store.py)
owns the transitions and the records built from these rows.

The engine and the table creation are `souverain.sqldb`'s (SQLite in WAL with immediate write
transactions; PostgreSQL's table creation under an advisory lock). Every transaction is
short: nothing slow (validation, training, file I/O) runs inside one.
"""

from __future__ import annotations

import sqlalchemy as sa

# the jobs database's engine (re-exported for its users in this package)
from souverain.sqldb import READ as READ
from souverain.sqldb import open_engine as open_engine
from souverain.sqldb import safe_url as safe_url

metadata = sa.MetaData()
files_t = sa.Table(
    "ft_files", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("sample_type", sa.String(32)),
    sa.Column("num_lines", sa.Integer),
    sa.Column("mimetype", sa.Text),
    sa.Column("path", sa.Text, nullable=False),
)
jobs_t = sa.Table(
    "ft_jobs", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("model", sa.Text, nullable=False),  # the served name clients sent
    sa.Column("model_path", sa.Text, nullable=False),  # what the worker loads
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("auto_start", sa.Boolean, nullable=False),
    sa.Column("hyperparameters", sa.JSON, nullable=False),
    sa.Column("training_files", sa.JSON, nullable=False),  # [{"file_id", "weight"}]
    sa.Column("validation_files", sa.JSON, nullable=False),  # [file_id]
    sa.Column("suffix", sa.Text),
    sa.Column("fine_tuned_model", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("modified_at", sa.Float, nullable=False),
    sa.Column("trained_tokens", sa.BigInteger),
    sa.Column("run_dir", sa.Text),
    sa.Column("adapter_dir", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("worker_pid", sa.Integer),
    sa.Column("worker_host", sa.Text),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("resumes", sa.Integer, nullable=False, default=0),
    # the holding worker process's own id: its lock file under finetune/workers/ says
    # whether it is alive, whatever pid reuse or a restarted container does to pids
    sa.Column("worker_token", sa.String(64)),
    # La Plateforme's job_type: NULL (older rows) or "completion", or "classifier" with its
    # targets ([{"name", "labels", "loss_function", "weight"}], filled at validation)
    sa.Column("job_type", sa.String(32)),
    sa.Column("classifier_targets", sa.JSON),
    # the release gate (souverain extension): the job's evaluation policy (NULL: released
    # when it succeeds), the gate's status (pending, running, passed, failed, overridden,
    # error), its reasons, the evaluation run that decided it, and who claimed it
    sa.Column("evaluation", sa.JSON),
    sa.Column("evaluation_status", sa.String(16)),
    sa.Column("evaluation_reasons", sa.JSON),
    sa.Column("evaluation_run_id", sa.String(64)),
    sa.Column("evaluation_owner", sa.String(64)),
)
events_t = sa.Table(
    "ft_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(36), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("data", sa.JSON),
)
checkpoints_t = sa.Table(
    "ft_checkpoints", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(36), nullable=False, index=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("metrics", sa.JSON),
    sa.Column("created_at", sa.Float, nullable=False),
)

lifecycle_t = sa.Table(
    "model_lifecycle", metadata,
    sa.Column("model_id", sa.String(256), primary_key=True),
    sa.Column("deprecation", sa.Text),  # ISO date (YYYY-MM-DD) the model is retired on
    sa.Column("deprecated_at", sa.Float),  # when it was marked deprecated (Deprecation header)
    sa.Column("replacement", sa.Text),  # deprecation_replacement_model
    sa.Column("withdrawn_at", sa.Float),  # not NULL: requests get 410 (or the replacement)
    sa.Column("fallback", sa.Boolean),  # this model's withdrawn fallback (NULL: the server's)
    sa.Column("archived", sa.Boolean, nullable=False, default=False),
    sa.Column("name", sa.Text),  # a fine-tuned model's name / description (PATCH)
    sa.Column("description", sa.Text),
    sa.Column("deleted_at", sa.Float),  # a deleted fine-tuned model: never served again
    sa.Column("modified_at", sa.Float, nullable=False),
    sa.Column("modified_by", sa.Text),
)


# evaluation runs (`souverain.finetune.eval_runs`): one row per run of `souverain eval`,
# recorded by the release gate or uploaded (`souverain eval run --upload`)
eval_runs_t = sa.Table(
    "eval_runs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the EvalRun's id (evr_ + 24 hex)
    sa.Column("model", sa.Text, nullable=False, index=True),  # the candidate model id
    sa.Column("base_model", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.Column("passed", sa.Boolean),  # the policy's verdict; NULL without a policy
    sa.Column("suites", sa.JSON, nullable=False),  # [suite name]
    sa.Column("source", sa.String(16), nullable=False),  # "gate" | "upload"
    sa.Column("job_id", sa.String(36)),  # the fine-tuning job a gate run decided
    sa.Column("created_by", sa.Text),  # the key id that uploaded it (NULL: no keys / gate)
    sa.Column("run", sa.JSON, nullable=False),  # EvalRun.to_json()
    sa.Column("html_path", sa.Text),  # the rendered report (under DATA/evaluations/)
)
