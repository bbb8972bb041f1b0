//! The fs applier (being written).
