//! The parts of `replikv` that are used outside the binary too: the configuration loader,
//! which the fuzz targets in `fuzz/` drive directly. The binary (`main.rs`) uses it from here.

pub mod config;
