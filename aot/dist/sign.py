"""Signing an index or release.json with an offline EC key, and checking such a signature, through
model-signing (OpenSSF): the signature is a sigstore bundle (DSSE envelope over an in-toto statement
of the file's sha256) that `model_signing verify key --public_key PUB` checks too. No network at
either end: no transparency log, no certificate authority, just the key pair.

model-signing signs files on disk, so bytes are written to a private temporary folder first."""

from __future__ import annotations

import tempfile
from pathlib import Path

from aot.errors import ConfigError, SignatureError

_MAKE_KEY = ("make one with `openssl ecparam -name prime256v1 -genkey -noout -out key.pem` "
             "(public half: `openssl ec -in key.pem -pubout -out pub.pem`)")


def check_private_key(path: Path, flag: str = "--sign") -> Path:
    """`path` if it holds an unencrypted EC private key in PEM; else ConfigError naming `flag`."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read(path, flag)
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise ConfigError(f"{flag} {path}: the key is encrypted; give an unencrypted EC private key (PEM)") from None
    except ValueError:
        raise ConfigError(f"{flag} {path}: not a PEM private key; {_MAKE_KEY}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{flag} {path}: not an elliptic-curve key (model-signing signs with EC keys); {_MAKE_KEY}")
    return path


def check_public_key(path: Path, flag: str = "--verify-key") -> Path:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read(path, flag)
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"{flag} {path}: not a PEM public key; give the signer's public key "
                          "(`openssl ec -in key.pem -pubout -out pub.pem`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{flag} {path}: not an elliptic-curve public key")
    return path


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read the key ({e.strerror}); {_MAKE_KEY}") from None


def sign_file(file: Path, key: Path, signature: Path) -> Path:
    """Write the signature of `file` made with private `key` (checked first) to `signature`."""
    from model_signing import signing  # ~0.4 s (sigstore, in-toto); only signing needs it

    signing.Config().use_elliptic_key_signer(private_key=str(Path(key).expanduser())).sign(file, signature)
    return signature


def sign_bytes(data: bytes, key: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix="aot-sign-") as d:
        f, sig = Path(d) / "index.json", Path(d) / "index.json.sig"
        f.write_bytes(data)
        return sign_file(f, key, sig).read_bytes()


def verify_bytes(data: bytes, signature: bytes, public_key: Path, where: str) -> None:
    """SignatureError unless `signature` is `public_key`'s signature of exactly `data`."""
    from model_signing import verifying

    with tempfile.TemporaryDirectory(prefix="aot-verify-") as d:
        f, sig = Path(d) / "index.json", Path(d) / "index.json.sig"
        f.write_bytes(data)
        sig.write_bytes(signature)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=str(Path(public_key).expanduser())).verify(f, sig)
        except Exception as e:  # any failure to verify untrusted bytes (bad JSON, wrong key, wrong digest) refuses
            reason = ("signed by another key than --verify-key's" if str(e).startswith("Key mismatch") else
                      "the signature does not match the index (tampered with, or a corrupt signature)")
            raise SignatureError(f"{where}: {reason}; refusing the index") from None
