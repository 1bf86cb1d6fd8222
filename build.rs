//! Builds the C++ shims (`src/dist/shim.cpp`, libtorch's distributed process groups for `vtp`'s data
//! parallelism; `src/train/aten.cpp`, the ATen calls tch does not bind: autocast regions, TF32, fused AdamW) against the headers of the libtorch
//! tch links (the pinned PyPI `torch` wheel in `.venv`, or `$LIBTORCH`), and links `vtp` with an rpath
//! to that libtorch, so the binary runs from a fresh shell with no environment variables.
use std::path::PathBuf;
use std::process::Command;

/// The libtorch `vtp` builds against: its root (holding `include/` and `lib/`) and whether it uses
/// the C++11 ABI of libstdc++.
struct Libtorch {
    root: PathBuf,
    cxx11_abi: bool,
}

fn libtorch() -> Option<Libtorch> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(Libtorch { root: PathBuf::from(dir), cxx11_abi: true });
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").ok()?);
    let venv_python = manifest.join(".venv/bin/python");
    let python = if venv_python.exists() { venv_python } else { PathBuf::from("python3") };
    let script =
        "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))";
    let out = Command::new(python).args(["-c", script]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let root = PathBuf::from(lines.next()?.trim());
    Some(Libtorch { root, cxx11_abi: lines.next()?.trim() == "1" })
}

/// Compiles the shims (c10d, autocast) with the flags the notes give: C++20, the wheel's ABI,
/// `USE_C10D_GLOO` (the Gloo headers come from Debian's `libgloo-dev`).
fn build_shim(torch: &Libtorch) {
    let include = torch.root.join("include");
    cc::Build::new()
        .cpp(true)
        .file("src/dist/shim.cpp")
        .file("src/train/aten.cpp")
        .std("c++20")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", if torch.cxx11_abi { "1" } else { "0" })
        .define("USE_DISTRIBUTED", None)
        .define("USE_C10D_GLOO", None)
        .flag("-w")
        .compile("vtp_shim");
    let lib = torch.root.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/dist/shim.cpp");
    println!("cargo:rerun-if-changed=src/train/aten.cpp");
    match libtorch() {
        Some(torch) => build_shim(&torch),
        None => panic!("no libtorch found: run `bash scripts/setup.sh` (a venv with torch) or set LIBTORCH"),
    }
}
