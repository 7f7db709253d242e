//! RESP2/RESP3 framing, commands and the connection loop.
pub mod codec;
