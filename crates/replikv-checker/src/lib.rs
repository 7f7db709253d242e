//! replikv-checker
