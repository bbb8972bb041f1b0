//! Tests of the fs source against real files and a real journal.
