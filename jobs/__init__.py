"""Scheduled governance jobs: the nightly MLflow audit pass, the deployment gate, the scheduler.

    persona-gov nightly --once --config jobs/nightly.example.yaml
    persona-gov gate --model my-llm --alias champion
    persona-gov schedule --config jobs/nightly.example.yaml --cron "0 2 * * *"

Modules, top to bottom: `config` (the YAML config and env overrides), `lease` (a database
row per version so two processes never audit the same version), `discovery` (which model
versions to audit), `verdict` (the interface to the policy, drift and report modules),
`nightly` (one pass), `gate`, `scheduler`, and `cli` (argparse registration). All MLflow
I/O for audit runs goes through `governance.tracking.runs`. Importing this package loads nothing
heavy.
"""
