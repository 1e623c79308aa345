"""The inference engine: sequences, paged KV blocks with prefix caching, scheduler, sampler, runner."""
