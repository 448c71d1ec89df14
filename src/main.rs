//! tollgate binary entry point.
fn main() {}
