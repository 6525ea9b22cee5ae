// `sqlx::migrate!` embeds the migrations at compile time but stable Rust cannot tell cargo which
// files it read, so without this an edited migration would leave a stale template in the tests.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
