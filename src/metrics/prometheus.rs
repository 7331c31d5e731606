//! Prometheus text exposition.
