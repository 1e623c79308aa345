"""A group of ranks: its context (rendezvous, liveness, process group), events and supervisor."""
