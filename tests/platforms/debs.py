"""Fetch Debian packages into a folder, without installing anything on the host.

`make test` uses it for QEMU's user-mode emulators (``qemu-user-static``, amd64) and for an arm64 CPython sysroot
(see ``../shared/spec/engine-notes.md``, "CPUs, emulation and wheels"). Packages come from Debian 12 (bookworm):
the ``Packages`` index of the architecture is read over HTTPS, every ``.deb`` is checked against its SHA-256 there,
and its data archive is unpacked into ``DEST`` (as ``dpkg -x`` does). Downloads are cached under ``.build/debian``.

Usage: ``python tests/platforms/debs.py --arch ARCH --dest DEST PACKAGE...``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import os
import shutil
import sys
import tarfile
import urllib.request

MIRROR = "https://deb.debian.org/debian"
SUITE = "bookworm"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, ".build", "debian")


def _download(url: str, path: str) -> None:
    tmp = path + ".part"
    with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as f:
        shutil.copyfileobj(resp, f)
    os.replace(tmp, path)


def packages_index(arch: str) -> dict[str, dict[str, str]]:
    """Returns the stanzas of bookworm's main ``Packages`` index for ``arch``, by package name."""
    path = os.path.join(CACHE, f"Packages-{SUITE}-{arch}.xz")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        _download(f"{MIRROR}/dists/{SUITE}/main/binary-{arch}/Packages.xz", path)
    index: dict[str, dict[str, str]] = {}
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for stanza in f.read().split("\n\n"):
            fields: dict[str, str] = {}
            key = None
            for line in stanza.splitlines():
                if line[:1] in (" ", "\t") and key:
                    fields[key] += "\n" + line.strip()
                elif ":" in line:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            if "Package" in fields:
                index[fields["Package"]] = fields
    return index


def fetch(arch: str, name: str, index: dict[str, dict[str, str]]) -> str:
    """Downloads one package (cached) after checking its SHA-256 and returns the path of the ``.deb``."""
    if name not in index:
        raise SystemExit(f"debs.py: no package {name!r} for {arch} in Debian {SUITE}")
    stanza = index[name]
    deb = os.path.join(CACHE, os.path.basename(stanza["Filename"]))
    for _attempt in range(2):
        if not os.path.exists(deb):
            _download(f"{MIRROR}/{stanza['Filename']}", deb)
        with open(deb, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest == stanza["SHA256"]:
            return deb
        os.remove(deb)
    raise SystemExit(f"debs.py: {deb}: SHA-256 {digest} differs from the index's {stanza['SHA256']}")


def extract(deb: str, dest: str) -> None:
    """Unpacks the data archive of a ``.deb`` (an ar archive) into ``dest``, keeping symlinks inside it."""
    with open(deb, "rb") as f:
        blob = f.read()
    if blob[:8] != b"!<arch>\n":
        raise SystemExit(f"debs.py: {deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        data = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if member.startswith("data.tar"):
            if member.endswith(".zst"):
                raise SystemExit(f"debs.py: {deb}: zstd-compressed data is not supported")
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                if sys.version_info >= (3, 12):
                    tar.extractall(dest, filter="tar")
                else:
                    tar.extractall(dest)
            return
    raise SystemExit(f"debs.py: {deb} has no data archive")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="Debian architecture: amd64, arm64, ...")
    parser.add_argument("--dest", required=True, help="folder to unpack into (created)")
    parser.add_argument("packages", nargs="+")
    args = parser.parse_args()
    index = packages_index(args.arch)
    os.makedirs(args.dest, exist_ok=True)
    for name in args.packages:
        extract(fetch(args.arch, name, index), args.dest)
    print(f"debs.py: {len(args.packages)} {args.arch} package(s) unpacked into {args.dest}")


if __name__ == "__main__":
    main()
