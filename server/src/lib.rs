//! Kiln's server: content-addressed storage, the REAPI services
//! (Capabilities, CAS, ByteStream, ActionCache, Remote Asset, Execution,
//! Operations) and the scheduler that hands actions to workers.
pub mod scheduler;
