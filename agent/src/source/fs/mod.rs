//! The fs source (being written).
