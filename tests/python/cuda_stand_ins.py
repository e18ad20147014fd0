"""Stand-ins for NVIDIA's libraries, so that PyPI's CUDA build of torch imports on a machine
without them (the Hugging Face check of tests/export.rs runs on CPU and calls none of them).

For each library torch 2.11.0+cu130 links against or preloads, builds a small shared library
that defines every symbol torch wants from it (in the version node it wants it in) as a
function that aborts with a message if it is ever called. Needs `nm` and `cc`.

Usage: cuda_stand_ins.py TORCH_PACKAGE_DIR OUT_DIR (OUT_DIR: <site>/nvidia/cu13/lib, where
torch looks for NVIDIA's libraries).
"""
import glob, os, subprocess, sys
torch_dir, out = sys.argv[1], sys.argv[2]
# What torch 2.11.0+cu130 (scripts/setup.sh) links against or preloads, by symbol prefix.
sonames = {"cublasLt": "libcublasLt.so.13", "cublas": "libcublas.so.13", "cudnn": "libcudnn.so.9",
           "cufft": "libcufft.so.12", "curand": "libcurand.so.10", "cusparseLt": "libcusparseLt.so.0",
           "cusparse": "libcusparse.so.12", "cusolver": "libcusolver.so.12", "nccl": "libnccl.so.2",
           "nvshmem": "libnvshmem_host.so.3", "cuFile": "libcufile.so.0", "nvrtc": "libnvrtc.so.13",
           "nvrtc-builtins": "libnvrtc-builtins.so.13", "nvJitLink": "libnvJitLink.so.13"}
prefixes = sorted(sonames, key=len, reverse=True)
symbols = {soname: {} for soname in sonames.values()}
for lib in glob.glob(os.path.join(torch_dir, "lib", "*.so*")) + glob.glob(os.path.join(torch_dir, "_C*.so")):
    listing = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
    for word in listing.split():
        name, _, version = word.partition("@")
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix:
            symbols[sonames[prefix]][name] = version.lstrip("@")
os.makedirs(out, exist_ok=True)
for soname, names in symbols.items():
    source, script = os.path.join(out, soname + ".c"), os.path.join(out, soname + ".map")
    with open(source, "w") as f:
        f.write("#include <stdio.h>\n#include <stdlib.h>\n")
        f.write("static void called(const char *n) { fprintf(stderr, \"%s: a stand-in for NVIDIA's library was called\\n\", n); abort(); }\n")
        f.writelines(f"void {n}(void) {{ called(\"{n}\"); }}\n" for n in sorted(names))
    # Symbols torch wants in a version node (cublasCreate_v2@libcublas.so.13) get that node.
    versions = sorted({v for v in names.values() if v})
    with open(script, "w") as f:
        for v in versions:
            f.write(f"{v} {{ global: {' '.join(n + ';' for n, nv in sorted(names.items()) if nv == v)} }};\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", os.path.join(out, soname), source, "-Wl,-soname," + soname]
                   + (["-Wl,--version-script=" + script] if versions else []), check=True)
    os.remove(source)
    os.remove(script)
