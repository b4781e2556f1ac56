"""Communication and throughput benchmarks, tables, plots."""
