"""Scheduled governance jobs: the nightly MLflow audit pass, the deployment gate, the scheduler.

    persona-gov nightly --once --config jobs/nightly.example.yaml
    persona-gov gate --model my-llm --alias champion
    persona-gov schedule --config jobs/nightly.example.yaml --cron "0 2 * * *"

The application layer over the `governance` library. Modules: `config` (the YAML config
and env overrides), `spec` (the audit spec the nightly runs), `connection` (reaching MLflow),
`lease` (a database row per version so two processes never audit the same version),
`discovery` (which model versions to audit), `baseline` (what a version is compared with),
`verdict` (policy, drift and report for one audit), `isolation` (an audit in a child
process), `ray_executor` (audits as Ray tasks, one per question shard), `nightly` (one
pass), `gate`,
`scheduler`, `demo`, and `cli` (the `persona-gov` command line). All MLflow I/O for audit
runs goes through `governance.tracking`. Importing this package loads nothing heavy.
"""
