"""Judging an audit: the policy verdict (`policy`), the change from a baseline (`drift`) and
the data-quality gate on inputs and outputs (`quality`). Never imports torch or MLflow."""
