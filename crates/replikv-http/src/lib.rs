//! replikv-http
