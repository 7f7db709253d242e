//! replikv-types
