"""Multirun sweeps: a child process per job, its peak memory, each job's result and the sweep summary."""
