//! Embeds libtorch's library folder as a run path of the `troupe` binary (and of its tests and
//! benches), so the built binary runs without LD_LIBRARY_PATH. A RUNPATH (--enable-new-dtags),
//! not an RPATH: LD_LIBRARY_PATH then still wins, which is how a binary built on one machine
//! is pointed at another machine's libtorch (scripts/gpu-check.sh --binary).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{libtorch}/lib");
    }
}
