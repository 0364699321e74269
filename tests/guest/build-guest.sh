#!/bin/bash
# Build (once) the tiny Linux guest that qmpbackup's end-to-end tests boot:
# a Debian cloud kernel plus an initramfs holding busybox, the virtio modules,
# qemu-ga with Debian's fsfreeze hook runner, and sqlite3 (for the database
# hooks of contrib/fsfreeze-hooks).  Everything comes from Debian packages fetched with
# `apt-get download`; nothing is installed on the host.
#
# The result is cached outside the source tree, keyed by the exact package
# versions and by this script, so a new package version or a changed recipe
# gives a new build while repeated runs cost only an apt-cache look-up:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/qmpbackup/test-guest/<key>/{vmlinuz,initramfs.gz}
#
# Several pytest workers may call this at once: builds are serialised with
# flock and a finished directory appears atomically (rename), so a reader
# never sees half a guest.
#
# The last line on stdout is the cache directory.  Exit status 77 means "the
# guest cannot be built here" (no package lists, no download possible): the
# test helper turns that into a skip, any other failure into an error.
set -euo pipefail

readonly READY_LINE=QMPBACKUP-GUEST-READY
readonly FAILED_LINE=QMPBACKUP-GUEST-FAILED
readonly AGENT_PORT=org.qemu.guest_agent.0
# Load order matters: insmod does not resolve dependencies.
readonly MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console"
readonly EXIT_UNAVAILABLE=77
# sqlite3 and the libraries it links beyond libc (which comes from the host,
# as qemu-ga's does): all fetched, so a host without them builds the same guest.
readonly SQLITE_PKGS=(sqlite3 libsqlite3-0 libreadline8 libtinfo6 zlib1g)

log() { echo "build-guest: $*" >&2; }
unavailable() { log "guest unavailable: $*"; exit "$EXIT_UNAVAILABLE"; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb ldd gzip flock sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || unavailable "$tool not found (needs a Debian-like host)"
done

# Each apt-cache call costs about half a second here (no pkgcache.bin), and
# it runs on every test session: resolve all packages in one call.
# The meta package only depends on the real, versioned kernel package; the
# key must name that one, since it is what changes the kernel we boot.
resolve_packages() {
    local info pkg="" line
    KERNEL_PKG="" KERNEL_VER="" BUSYBOX_VER="" QGA_VER="" SQLITE_PINS=()
    info=$(apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static qemu-guest-agent \
        "${SQLITE_PKGS[@]}" 2>/dev/null) || true
    while IFS= read -r line; do
        case "$line" in
            "Package: "*) pkg=${line#Package: } ;;
            "Version: "*)
                case "$pkg" in
                    busybox-static) BUSYBOX_VER=${line#Version: } ;;
                    qemu-guest-agent) QGA_VER=${line#Version: } ;;
                    *) case " ${SQLITE_PKGS[*]} " in
                           *" $pkg "*) SQLITE_PINS+=("$pkg=${line#Version: }") ;;
                       esac ;;
                esac ;;
            "Depends: "*)
                if [ "$pkg" = linux-image-cloud-amd64 ]; then
                    KERNEL_PKG=$(printf '%s\n' "${line#Depends: }" | tr ',' '\n' \
                        | sed -n 's/^ *\(linux-image-[0-9][^ ]*-cloud-amd64\).*/\1/p' | head -n1)
                    KERNEL_VER=$(printf '%s\n' "${line#Depends: }" | tr ',' '\n' \
                        | sed -n 's/^ *linux-image-[0-9][^ ]*-cloud-amd64 *(= *\([^)]*\)).*/\1/p' | head -n1)
                fi ;;
        esac
    done <<<"$info"
    [ -n "$KERNEL_PKG" ] || return 1
    if [ -z "$KERNEL_VER" ]; then
        # Not pinned by the meta package: ask for the candidate.
        KERNEL_VER=$(apt-cache show --no-all-versions "$KERNEL_PKG" 2>/dev/null \
            | sed -n 's/^Version: //p' | head -n1)
    fi
    [ -n "$KERNEL_VER" ] && [ -n "$BUSYBOX_VER" ] && [ -n "$QGA_VER" ] \
        && [ "${#SQLITE_PINS[@]}" -eq "${#SQLITE_PKGS[@]}" ]
}

if ! resolve_packages; then
    if [ "$(id -u)" -eq 0 ]; then
        log "package lists lack the guest packages; running apt-get update"
        apt-get update -qq >&2 || unavailable "apt-get update failed"
        resolve_packages || unavailable "apt knows no linux-image-cloud-amd64, busybox-static, qemu-guest-agent or ${SQLITE_PKGS[*]}"
    else
        unavailable "apt knows no linux-image-cloud-amd64, busybox-static, qemu-guest-agent or ${SQLITE_PKGS[*]} (run apt-get update as root)"
    fi
fi

script_sum=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-64)
KEY=$({ printf '%s=%s\n' \
        "$KERNEL_PKG" "$KERNEL_VER" \
        busybox-static "$BUSYBOX_VER" \
        qemu-guest-agent "$QGA_VER" \
        build-guest.sh "$script_sum"
      printf '%s\n' "${SQLITE_PINS[@]}"; } \
    | sha256sum | cut -c1-16)

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/qmpbackup/test-guest"
FINAL="$CACHE_ROOT/$KEY"

complete() { [ -s "$FINAL/vmlinuz" ] && [ -s "$FINAL/initramfs.gz" ]; }

if complete; then
    touch "$FINAL"  # marks it as used, see the pruning at the end
    echo "$FINAL"
    exit 0
fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock -w 900 9 || die "timed out waiting for another build to finish ($CACHE_ROOT/.lock)"
# Another worker may have finished while we waited for the lock.
if complete; then
    echo "$FINAL"
    exit 0
fi

WORK=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "building guest $KEY ($KERNEL_PKG $KERNEL_VER, busybox-static $BUSYBOX_VER, qemu-guest-agent $QGA_VER, ${SQLITE_PINS[*]})"

# --- fetch and unpack -------------------------------------------------------
mkdir "$WORK/debs" "$WORK/pkg"
apt_opts=()
# As root, apt drops to the _apt user to download and warns that it cannot
# write into our private temp dir; downloading as root is what we want here.
[ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)
if ! (cd "$WORK/debs" && apt-get "${apt_opts[@]}" -q download \
        "$KERNEL_PKG=$KERNEL_VER" "busybox-static=$BUSYBOX_VER" "qemu-guest-agent=$QGA_VER" \
        "${SQLITE_PINS[@]}" >&2); then
    unavailable "apt-get download failed (no network or package mirror?)"
fi
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/pkg"
done

PKG="$WORK/pkg"
BUSYBOX="$PKG/bin/busybox"
QGA="$PKG/usr/sbin/qemu-ga"
KERNEL=$(find "$PKG/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
[ -x "$BUSYBOX" ] || die "busybox-static has no bin/busybox"
[ -x "$QGA" ] || die "qemu-guest-agent has no usr/sbin/qemu-ga"
SQLITE3="$PKG/usr/bin/sqlite3"
[ -x "$SQLITE3" ] || die "sqlite3 has no usr/bin/sqlite3"
FSFREEZE_HOOK="$PKG/etc/qemu/fsfreeze-hook"
[ -f "$FSFREEZE_HOOK" ] || die "qemu-guest-agent has no etc/qemu/fsfreeze-hook"
[ -n "$KERNEL" ] || die "$KERNEL_PKG has no boot/vmlinuz-*"
KMOD_DIR=$(find "$PKG/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)
[ -n "$KMOD_DIR" ] || die "$KERNEL_PKG has no lib/modules/<version>"

# --- initramfs tree ---------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,mnt,run,tmp,etc,lib/modules}
# /var/log: where the fsfreeze hook runner logs.
mkdir -p "$ROOT/var/log"
ln -s ../run "$ROOT/var/run"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    if [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ]; then
        continue
    fi
    mkdir -p "$ROOT/$(dirname "$applet")"
    ln -s /bin/busybox "$ROOT/$applet"
done

# Modules go in flat, uncompressed (busybox insmod cannot read .xz/.zst) and in
# load order, listed in /etc/modules-order for /init.  A module built into the
# kernel is simply left out.
: >"$ROOT/etc/modules-order"
for mod in $MODULES; do
    src=$(find "$KMOD_DIR/kernel" \( -name "$mod.ko" -o -name "$mod.ko.xz" -o -name "$mod.ko.zst" \) | head -n1)
    if [ -z "$src" ]; then
        if grep -q "/$mod\.ko" "$KMOD_DIR/modules.builtin" 2>/dev/null; then
            continue
        fi
        die "module $mod is neither in $KERNEL_PKG nor built in"
    fi
    case "$src" in
        *.ko.xz) xz -dc "$src" >"$ROOT/lib/modules/$mod.ko" ;;
        *.ko.zst) command -v zstd >/dev/null 2>&1 || die "$mod is zstd-compressed and zstd is missing"
                  zstd -q -dc "$src" >"$ROOT/lib/modules/$mod.ko" ;;
        *) cp "$src" "$ROOT/lib/modules/$mod.ko" ;;
    esac
    echo "$mod" >>"$ROOT/etc/modules-order"
done

# qemu-ga and sqlite3 are dynamically linked: take the libraries (and the
# loader) ldd resolves for them — sqlite3's own from the unpacked packages,
# the rest (libc) from the host, which is Debian too, so they match what the
# binaries were built for.
pkg_libdirs=$(find "$PKG/lib" "$PKG/usr/lib" -name '*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
copy_with_libs() {  # BINARY DEST: copy BINARY into the guest at DEST with its libraries
    local binary=$1 dest=$2 ldd_out lib
    cp "$binary" "$ROOT$dest"
    ldd_out=$(LD_LIBRARY_PATH="$pkg_libdirs" ldd "$binary") || die "ldd $binary failed"
    if printf '%s\n' "$ldd_out" | grep -q 'not found'; then
        die "$dest needs libraries the host lacks: $(printf '%s\n' "$ldd_out" | grep 'not found' | tr -s ' \t\n' ' ')"
    fi
    for lib in $(printf '%s\n' "$ldd_out" | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p'); do
        local inside=${lib#"$PKG"}
        mkdir -p "$ROOT$(dirname "$inside")"
        cp -L "$lib" "$ROOT$inside"
    done
}
copy_with_libs "$QGA" /usr/sbin/qemu-ga
copy_with_libs "$SQLITE3" /usr/bin/sqlite3
# Debian's hook runner: runs every executable in /etc/qemu/fsfreeze-hook.d
# (empty here; tests install hooks) and logs to /var/log/qga-fsfreeze-hook.log.
mkdir -p "$ROOT/etc/qemu/fsfreeze-hook.d"
cp "$FSFREEZE_HOOK" "$ROOT/etc/qemu/fsfreeze-hook"
chmod 755 "$ROOT/etc/qemu/fsfreeze-hook"
printf '[general]\nfsfreeze-hook=/etc/qemu/fsfreeze-hook\n' >"$ROOT/etc/qemu/qemu-ga.conf"

cat >"$ROOT/init" <<EOF
#!/bin/sh
# PID 1 of the qmpbackup test guest.  It prints exactly one of
# $READY_LINE or $FAILED_LINE on the serial console so the host side can
# stop waiting as soon as the outcome is known.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

fail() {
    echo "$FAILED_LINE: \$*"
    sync
    poweroff -f
}

while read -r mod; do
    insmod "/lib/modules/\$mod.ko" || fail "insmod \$mod"
done </etc/modules-order

# Probing is asynchronous: give the devices a moment to appear.
wait_for() {
    i=0
    while [ \$i -lt 100 ]; do
        eval "\$1" && return 0
        sleep 0.05
        i=\$((i + 1))
    done
    return 1
}

if wait_for '[ -b /dev/vda ]'; then
    mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda on /mnt"
else
    echo "qmpbackup-guest: no /dev/vda, /mnt stays empty"
fi

find_port() {
    for f in /sys/class/virtio-ports/*/name; do
        [ -r "\$f" ] || continue
        if [ "\$(cat "\$f")" = "$AGENT_PORT" ]; then
            port=\$(basename "\$(dirname "\$f")")
            [ -c "/dev/\$port" ] && return 0
        fi
    done
    return 1
}
port=
wait_for find_port || fail "no virtio-serial port named $AGENT_PORT"

mkdir -p /run/qemu-ga
# -t: the state dir (freeze state, pid file) must be writable; the default
# lives under /var which only exists here as a link to /run.
# /etc/qemu/qemu-ga.conf enables the fsfreeze hook, as the README tells admins.
qemu-ga -m virtio-serial -p "/dev/\$port" -t /run/qemu-ga -f /run/qemu-ga/qemu-ga.pid &
qga_pid=\$!
echo "$READY_LINE agent-port=/dev/\$port"

# PID 1 must never exit (panic=-1 would reboot, -no-reboot would end QEMU);
# it also reaps whatever guest-exec leaves orphaned.
wait \$qga_pid
echo "qmpbackup-guest: qemu-ga exited with status \$?"
while :; do
    wait
    sleep 1
done
EOF
chmod 755 "$ROOT/init"

OUT="$WORK/out"
mkdir "$OUT"
cp "$KERNEL" "$OUT/vmlinuz"
(cd "$ROOT" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) \
    | gzip -6 -n >"$OUT/initramfs.gz"
{ printf '%s=%s\n' "$KERNEL_PKG" "$KERNEL_VER" busybox-static "$BUSYBOX_VER" \
    qemu-guest-agent "$QGA_VER"; printf '%s\n' "${SQLITE_PINS[@]}"; } >"$OUT/packages"

# An incomplete directory of this key (someone deleted a file from the
# cache) is replaced; we hold the lock, so nobody is reading a half of it.
rm -rf "$FINAL"
mv "$OUT" "$FINAL"
# Every new package version or script revision leaves an old build (~18 MB)
# behind; drop those nobody has used for two weeks.
find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d -name '[0-9a-f]*' -mtime +14 \
    -exec rm -rf {} + 2>/dev/null || true
log "guest ready in $FINAL"
echo "$FINAL"
