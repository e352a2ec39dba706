"""`edge-sdk verify BUNDLE [--key PUB]`: check a bundle's hashes and signature; `--keygen DIR` makes a key pair."""

from __future__ import annotations

from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("verify", help="check a bundle's file hashes and ed25519 signature; create signing keys")
    p.add_argument("bundle", metavar="BUNDLE", nargs="?")
    p.add_argument("--key", metavar="PUB", help="trusted ed25519 public key: the signature must verify against it")
    p.add_argument("--keygen", metavar="DIR", help="write a new key pair (signing.key, signing.pub) into DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bundle import generate_keypair, verify_bundle
    from ..errors import ConfigError

    out: dict = {}
    if args.keygen:
        priv, pub = generate_keypair(args.keygen)
        out["keygen"] = {"private_key": str(priv), "public_key": str(pub)}
        if not args.json:
            print(f"wrote {priv} (keep it secret) and {pub}")
    if args.bundle is None:
        if not args.keygen:
            raise ConfigError("nothing to do: pass a BUNDLE to verify, or --keygen DIR")
        if args.json:
            print_json(out)
        return 0
    m = verify_bundle(args.bundle, args.key)
    out |= {"bundle": args.bundle, "ok": True, "signed": args.key is not None, "files": len(m["files"]),
            "bytes": sum(f["size"] for f in m["files"].values()), "source": m.get("source", {}).get("name"),
            "quantization": m.get("quantization"), "accuracy": m.get("accuracy")}
    if args.json:
        print_json(out)
    else:
        print(f"{args.bundle}: OK, {out['files']} files, {out['bytes'] / 2**20:.2f} MiB, "
              + ("signature verified" if args.key else "hashes verified (no --key: signature not checked)"))
    return 0
