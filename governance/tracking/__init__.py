"""MLflow at the edge: audit runs (`runs`) and the approval record on model versions
(`registry`). The only package that talks to MLflow's tracking API."""
