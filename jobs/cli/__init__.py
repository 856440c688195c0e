"""`persona-gov`: the console script (`main`) and one module per command group: `audit`,
`policy`, `drift`, `nightly` (nightly, gate, schedule) and `demo`; `exits` holds the exit
codes they all follow."""
