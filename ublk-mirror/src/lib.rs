//! ublk-mirror: the source side drivers of the mirroring engine.
