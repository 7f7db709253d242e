//! replikv-placement
