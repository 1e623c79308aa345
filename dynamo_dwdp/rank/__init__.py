"""Assembly of one rank: strategy executor + model runner + engine (and local groups of ranks)."""
