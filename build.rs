//! Build script: rebuilds the crate when a migration file changes. `sqlx::migrate!` embeds
//! `migrations/` at compile time, and cargo does not otherwise notice a file added there (sqlx's
//! documented remedy, as `sqlx migrate build-script` writes it).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
