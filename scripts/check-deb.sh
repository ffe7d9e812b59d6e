#!/usr/bin/env bash
# `make check-deb`: builds the .deb with `make deb` and checks that `dpkg-deb -c` lists every file
# the package must carry, with the right modes, that its binary is stripped (the debug symbols
# are in the -dbgsym .ddeb beside it), and that its control data names the package. Prints the
# sizes. Slow (a release build, and `cargo install cargo-deb` the first time); not part of
# `make test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v dpkg-deb >/dev/null || { echo "check-deb: dpkg-deb missing (apt-get install dpkg)" >&2; exit 1; }

make --no-print-directory deb

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=$(ls -t target/debian/ntp-dtls_"${version}"*.deb 2>/dev/null | head -1)
ddeb=$(ls -t target/debian/ntp-dtls-dbgsym_"${version}"*.ddeb 2>/dev/null | head -1)
[[ -n $deb ]] || { echo "check-deb: no target/debian/ntp-dtls_${version}*.deb after make deb" >&2; exit 1; }
echo "check-deb: $deb"

listing=$(dpkg-deb -c "$deb")
echo "$listing" | awk '{print "   " $1 " " $6}'

# mode path, one per line: what the package must contain.
expected=(
    "-rwxr-xr-x ./usr/bin/ntp-dtls"
    "-rw-r--r-- ./lib/systemd/system/ntp-dtls-server.service"
    "-rw-r--r-- ./lib/systemd/system/ntp-dtls-client.service"
    "-rw-r--r-- ./usr/lib/sysusers.d/ntp-dtls.conf"
    "-rw-r--r-- ./usr/share/doc/ntp-dtls/examples/client.toml"
    "-rw-r--r-- ./usr/share/doc/ntp-dtls/examples/server.toml"
    "-rw-r--r-- ./usr/share/doc/ntp-dtls/README.md"
    "-rw-r--r-- ./usr/share/doc/ntp-dtls/OPERATIONS.md"
    "-rw-r--r-- ./usr/share/doc/ntp-dtls/copyright"
    "-rw-r--r-- ./usr/share/man/man1/ntp-dtls.1.gz"
    "-rw-r--r-- ./usr/share/man/man5/ntp-dtls.toml.5.gz"
)
# One man page per subcommand of the CLI.
for page in target/man/ntp-dtls-*.1.gz; do
    expected+=("-rw-r--r-- ./usr/share/man/man1/$(basename "$page")")
done

failed=0
for entry in "${expected[@]}"; do
    mode=${entry%% *}
    path=${entry#* }
    if ! echo "$listing" | awk -v m="$mode" -v p="$path" '$1 == m && $6 == p { found = 1 } END { exit !found }'; then
        echo "check-deb: MISSING $path (mode $mode)" >&2
        failed=1
    fi
done
for sub in client server certs query; do
    echo "$listing" | grep -q "./usr/share/man/man1/ntp-dtls-$sub.1.gz" || {
        echo "check-deb: MISSING man page ntp-dtls-$sub.1.gz" >&2
        failed=1
    }
done

# The units in the package are the ones in dist/, and the man pages are real roff.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
for unit in ntp-dtls-server.service ntp-dtls-client.service; do
    cmp -s "dist/systemd/$unit" "$tmp/lib/systemd/system/$unit" || {
        echo "check-deb: $unit differs from dist/systemd/$unit" >&2
        failed=1
    }
done
zcat "$tmp/usr/share/man/man1/ntp-dtls-client.1.gz" | grep -q '^\.TH' || {
    echo "check-deb: ntp-dtls-client.1.gz is not a man page" >&2
    failed=1
}
# Stripped: no DWARF in the packaged binary; the symbols are in the .ddeb, matched by build id.
if readelf -S "$tmp/usr/bin/ntp-dtls" | grep -q '\.debug_info'; then
    echo "check-deb: usr/bin/ntp-dtls carries debug info: it should be stripped" >&2
    failed=1
fi
if [[ -z $ddeb ]]; then
    echo "check-deb: no target/debian/ntp-dtls-dbgsym_${version}*.ddeb beside the .deb" >&2
    failed=1
else
    dpkg-deb -c "$ddeb" | grep -q '/usr/lib/debug/.build-id/.*\.debug$' || {
        echo "check-deb: $ddeb holds no .build-id debug file" >&2
        failed=1
    }
fi
zcat "$tmp/usr/share/man/man5/ntp-dtls.toml.5.gz" | grep -q '^\.SH "SERVER FILE"' || {
    echo "check-deb: ntp-dtls.toml.5.gz lacks its SERVER FILE section" >&2
    failed=1
}
"$tmp/usr/bin/ntp-dtls" --version | grep -q "ntp-dtls $version" || {
    echo "check-deb: the packaged binary does not report version $version" >&2
    failed=1
}
for script in postinst prerm postrm; do
    dpkg-deb --ctrl-tarfile "$deb" | tar -t | grep -qx "./$script" || {
        echo "check-deb: control archive lacks $script" >&2
        failed=1
    }
done
dpkg-deb -f "$deb" Package Version Architecture Depends | sed 's/^/   /'

if ((failed)); then
    echo "check-deb: FAILED" >&2
    exit 1
fi
echo "check-deb: OK: ${#expected[@]} expected files present in $(basename "$deb")"
echo "check-deb: sizes: $(basename "$deb") $(stat -c %s "$deb") bytes, usr/bin/ntp-dtls $(stat -c %s "$tmp/usr/bin/ntp-dtls") bytes${ddeb:+, $(basename "$ddeb") $(stat -c %s "$ddeb") bytes}"
