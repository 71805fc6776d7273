"""Outbound delivery: the router (where a domain's mail goes next: configured
route, smarthost or DNS MX) and the scheduler (queue runner, backoff,
concurrency limits)."""
