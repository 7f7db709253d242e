//! replikv-cluster
