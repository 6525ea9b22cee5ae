// `store::MIGRATOR` embeds `migrations/` at compile time, and stable Rust cannot tell cargo which files a
// macro read: without this, an edited migration would not rebuild the binary that applies it.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
