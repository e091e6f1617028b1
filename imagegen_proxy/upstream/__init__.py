"""Where a request goes: the upstreams, their transport, the pool, the relay."""
