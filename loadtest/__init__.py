"""Load tests, benchmarks and the demo client: everything that drives the servers from outside."""
