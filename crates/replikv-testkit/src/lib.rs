//! replikv-testkit
