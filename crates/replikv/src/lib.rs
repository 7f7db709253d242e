//! The parts of `replikv` that are used outside the binary too: the configuration loader,
//! so that tools such as fuzz targets can drive it directly. The binary (`main.rs`) uses it
//! from here.

pub mod config;
