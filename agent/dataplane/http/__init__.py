"""L7: the HTTP request loop, per-request decisions, upstream pools and the access log."""
