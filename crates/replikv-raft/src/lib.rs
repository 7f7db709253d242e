//! replikv-raft
