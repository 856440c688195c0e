"""The audit: question set and personas -> prompts -> model runs -> tidy score tables.

Modules, in the order data flows: `spec` (what to audit, and its hash), `run` (the passes
over the model), `screen` (the optional AtP screen), `shards` (an audit split by
question, merged exactly), `tables` and `behaviour` (numbers to
tables), `result` (the tables and metadata, saved and loaded as one directory). `spec`,
`result`, `tables` and `behaviour` never import torch.
"""
