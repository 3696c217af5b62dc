#!/usr/bin/env bash
# Builds the seed corpora of the fuzz targets from the repository's small valid files:
# the MMDiT fixtures and packages written by `hiprune compress`. Run from anywhere.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
corpus="$here/corpus"
rm -rf "$corpus"
mkdir -p "$corpus"/{package_open,manifest_decode,checkpoint_folder,inputs_file}

# Packages: the sd35 fixture in f32, and a tiny generated model in INT4 and NF4.
hiprune() { (cd "$root" && cargo run --quiet --release -- "$@"); }
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
hiprune compress "$root/tests/fixtures/mmdit/sd35" -o "$corpus/package_open/sd35-f32.hpk" --weights f32 >/dev/null 2>&1
hiprune generate "$scratch/tiny" --preset tiny --seed 1 >/dev/null 2>&1
hiprune compress "$scratch/tiny" -o "$corpus/package_open/tiny-int4.hpk" --weights int4 --remove-blocks 2 >/dev/null 2>&1
hiprune compress "$scratch/tiny" -o "$corpus/package_open/tiny-nf4.hpk" --weights nf4 >/dev/null 2>&1

python3 - "$root" "$corpus" <<'PY'
import json, struct, sys, pathlib
root, corpus = map(pathlib.Path, sys.argv[1:])

def header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, json.loads(data[8:8 + n]), 8 + n

# Manifest seeds: the manifest bytes of every seed package.
for pkg in (corpus / "package_open").glob("*.hpk"):
    data, head, start = header(pkg)
    a, b = head["__manifest__"]["data_offsets"]
    (corpus / "manifest_decode" / (pkg.stem + ".postcard")).write_bytes(data[start + a:start + b])

# Checkpoint seeds: [u16 config len][u16 index len][config][index][shard].
fixtures = root / "tests" / "fixtures" / "mmdit"
for name in ["sd3", "sd35", "mmditx", "sd3_f16"]:
    folder = fixtures / name
    config = (folder / "config.json").read_bytes()
    shard = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    _, head, _ = header(folder / "diffusion_pytorch_model.safetensors")
    index = json.dumps({"metadata": {"total_size": len(shard)},
                        "weight_map": {t: "a.safetensors" for t in head if t != "__metadata__"}}).encode()
    for idx, suffix in [(b"", "single"), (index, "indexed")]:
        seed = struct.pack("<HH", len(config), len(idx)) + config + idx + shard
        (corpus / "checkpoint_folder" / f"{name}-{suffix}.bin").write_bytes(seed)
    (corpus / "inputs_file" / f"{name}.safetensors").write_bytes((folder / "inputs.safetensors").read_bytes())

# Single-file seeds: both lengths 0, then the file.
for single in sorted((root / "tests" / "fixtures" / "single_file").glob("*.safetensors")):
    seed = struct.pack("<HH", 0, 0) + single.read_bytes()
    (corpus / "checkpoint_folder" / f"single-{single.stem}.bin").write_bytes(seed)
PY
echo "seed corpora written under $corpus"
ls -l "$corpus"/*
