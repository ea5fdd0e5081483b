//! Helpers for the end-to-end tests: a fault-injecting TCP proxy and process management.
