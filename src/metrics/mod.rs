//! Counters and the Prometheus endpoint.
