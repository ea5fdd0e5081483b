//! The target server: receives mirrored operations over TCP and applies them to a target volume.
