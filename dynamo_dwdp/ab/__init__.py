"""A/B harness: workloads, load generator, server-side evidence, Pareto report (`dynamo-dwdp ab`)."""
