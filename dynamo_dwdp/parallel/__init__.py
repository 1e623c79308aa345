"""Parallel strategies: the MoEExecutor interface, single / dp / dep / tp executors, process groups."""
