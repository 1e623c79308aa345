"""Peer collectives over shared memory / CUDA IPC (no NCCL): all-to-all and all-reduce for the DEP and TP baselines."""
