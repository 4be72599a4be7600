//! Run one command hermetically with a directory as its filesystem root.
//! Knows nothing of gRPC.
