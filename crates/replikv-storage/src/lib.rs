//! replikv-storage
