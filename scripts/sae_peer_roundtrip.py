"""Dictionaries written by sparsen, read back by SAELens and sparsify themselves: the same latents and outputs.

    .venv/bin/python scripts/sae_peer_roundtrip.py [--peer /work/venv-peers-sae/bin/python] [--dir /tmp/sae-roundtrip]

Every fixture in tests/data/sae (written by SAELens 6.54.12 / eai-sparsify 1.3.3) is loaded by sparsen and saved
again by ``save_saelens`` / ``save_sparsify``, with a sparsen BatchTopK besides (saved as SAELens's jumprelu); the
peer venv's libraries then load each folder (``SAE.load_from_disk``, ``SparseCoder.load_from_disk``) and compare
their latents and outputs with sparsen's. Prints one line per folder with the largest differences.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

CHECK = r'''
import glob, os, sys, torch
from safetensors.torch import load_file
from sae_lens import SAE
from sparsify import SparseCoder
worst = 0.0
for d in sorted(glob.glob(sys.argv[1] + "/*/")):
    e = load_file(d + "expected.safetensors")
    with torch.no_grad():
        if os.path.exists(d + "sae.safetensors"):
            sc = SparseCoder.load_from_disk(d, device="cpu")
            enc = sc.encode(e["x"])
            lat = torch.zeros(e["x"].shape[0], sc.num_latents).scatter(1, enc.top_indices, enc.top_acts)
            rec, kind = sc(e["x"]).sae_out, type(sc).__name__
        else:
            sae = SAE.load_from_disk(d, device="cpu")
            lat, rec, kind = sae.encode(e["x"]), sae(e["x"]), type(sae).__name__
    dl, dr = float((lat - e["latents"]).abs().max()), float((rec - e["recon"]).abs().max())
    worst = max(worst, dl, dr)
    print(f"{os.path.basename(d[:-1]):34s} {kind:24s} latents {dl:.1e}  output {dr:.1e}")
print(f"largest difference {worst:.1e}")
sys.exit(0 if worst < 1e-5 else 1)
'''


def main() -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from sparsen.sae import build_sae, sae_config
    from sparsen.sae.formats import load_sae, save_saelens, save_sparsify

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", default="/work/venv-peers-sae/bin/python", help="python of a venv with sae-lens, eai-sparsify")
    ap.add_argument("--dir", default="/tmp/sae-roundtrip")
    args = ap.parse_args()
    root = Path(args.dir)
    fixtures = Path(__file__).resolve().parents[1] / "tests" / "data" / "sae"
    for d in sorted(p for p in fixtures.iterdir() if (p / "reference.safetensors").exists()):
        sae = load_sae(d)
        x = load_file(d / "reference.safetensors")["x"]
        (save_sparsify if d.name.startswith("sparsify") else save_saelens)(sae, root / d.name)
        with torch.no_grad():
            o = sae(x)
        save_file({"x": x, "latents": o.latents.contiguous(), "recon": o.recon.contiguous()},
                  root / d.name / "expected.safetensors")
    g = torch.Generator().manual_seed(1)
    b = build_sae(sae_config("batchtopk", d_in=16, d_sae=48, k=4))
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        b.threshold.fill_(0.3)
        x = torch.randn(32, 16, generator=g)
        o = b(x)
    save_saelens(b, root / "sparsen-batchtopk")
    save_file({"x": x, "latents": o.latents.contiguous(), "recon": o.recon.contiguous()},
              root / "sparsen-batchtopk" / "expected.safetensors")
    return subprocess.run([args.peer, "-c", CHECK, str(root)], env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}).returncode


if __name__ == "__main__":
    raise SystemExit(main())
