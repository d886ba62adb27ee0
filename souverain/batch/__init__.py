"""Batch jobs (La Plateforme's ``client.batch.jobs``) over the files API, behind interactive
traffic.

  store.py    `BatchStore`: the jobs' rows, in the fine-tuning jobs database (`JobStore`'s
              engine: SQLite or PostgreSQL), each transition one conditional UPDATE
  lines.py    input lines (``{"custom_id", "body"}``) checked one by one, the output and error
              line shapes, and the `Journal`: one fsync'd line per finished request
  runner.py   `run_job`: one job as a server holds it (claimed, resumed from its journal,
              a few lines in flight, cancel and timeout honoured, output/error files at the end)

The server (`souverain.server.batch`) executes each line through the same service code as the
interactive routes and runs `run_job` for the jobs of the models it serves; `souverain batch
run` executes a local file the same way, in one process, at full batch.
"""
