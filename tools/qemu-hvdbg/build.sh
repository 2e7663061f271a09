#!/usr/bin/env bash
# Build Debian 12's own QEMU (the version installed, from its source package) with
# hvdbg.patch: event rings and state checks in QEMU's SVM code, for hunting the
# open SMP fault (README, SMP). Opt-in debugging aid: CI and `cargo xtask test` never
# use it. Idempotent; needs root on Debian 12 (apt-get) and about 10 minutes on 2 cores.
#
#   tools/qemu-hvdbg/build.sh            # -> target/qemu-hvdbg/bin/qemu-system-x86_64
#   PATH=$PWD/target/qemu-hvdbg/bin:$PATH HV_STRESS_SECS=900 \
#     cargo xtask test --system-only --filter smp-qemu-mttcg-control-stress
#   grep HVDBG target/xtask/runs/smp-stress-*/qemu.stderr
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${CARGO_TARGET_DIR:-$root/target}/qemu-hvdbg"
mkdir -p "$out/bin"

installed="$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)"
if [ -z "$installed" ]; then
    echo "qemu-hvdbg: qemu-system-x86 is not installed (cargo xtask test installs it)" >&2
    exit 1
fi
# A binary rebuild (+bN) has the source of the version without the suffix.
version="${installed%+b[0-9]*}"
version="${version#*:}"

if [ ! -e /etc/apt/sources.list.d/qemu-hvdbg-src.sources ] && ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/qemu-hvdbg-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -q
fi
apt-get install -y -q dpkg-dev meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev >/dev/null

src="$out/src-$version"
if [ ! -d "$src" ]; then
    mkdir -p "$out/dl" && (cd "$out/dl" && apt-get source -q "qemu=1:$version" >/dev/null)
    tree="$(find "$out/dl" -maxdepth 1 -mindepth 1 -type d -name 'qemu-*' | head -1)"
    [ -n "$tree" ] || { echo "qemu-hvdbg: apt-get source gave no tree" >&2; exit 1; }
    patch -d "$tree" -p1 < "$here/hvdbg.patch"
    mv "$tree" "$src"
fi
if [ ! -x "$src/build/qemu-system-x86_64" ]; then
    mkdir -p "$src/build"
    (cd "$src/build" && ../configure --target-list=x86_64-softmmu --prefix=/usr --disable-docs --disable-werror \
        --disable-gtk --disable-sdl --disable-vnc --disable-spice --disable-opengl --disable-virglrenderer \
        --disable-xen --disable-kvm --disable-capstone --disable-slirp --disable-user --disable-tools \
        --disable-guest-agent --disable-gio >/dev/null)
fi
ninja -C "$src/build" qemu-system-x86_64
ln -sf "$src/build/qemu-system-x86_64" "$out/bin/qemu-system-x86_64"
echo "qemu-hvdbg: $out/bin/qemu-system-x86_64 ($("$out/bin/qemu-system-x86_64" --version | head -1), with hvdbg.patch)"
