"""What a person reads: the audit's figures (`figures`) and the self-contained report page
(`page`) that MLflow's artifact viewer shows."""
