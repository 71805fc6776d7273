"""Delivery out of the spool: the scheduler (queue runner, backoff,
concurrency limits), the router (which courier and destination for each
recipient: local, configured route, smarthost or DNS MX), and the couriers
(SMTP relay, local delivery) with the types they share."""
