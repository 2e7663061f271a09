# The data of hv.test=sha and its two digests, shared by the guest's /init (as
# /etc/sha.sh) and by xtask on the host, which runs it with the same busybox (every
# command resolved to a busybox applet) to know what the guest must print.
# Usage: sh sha.sh DIR   (DIR gets a 32 MiB file, data, which is removed again)
set -e
dir=$1
dd if=/dev/zero bs=1M count=32 2>/dev/null | tr '\0' x > "$dir/data"
echo "HV-SHA256 $(sha256sum < "$dir/data" | cut -d' ' -f1)"
echo "HV-GZIP-SHA256 $(gzip -c < "$dir/data" | sha256sum | cut -d' ' -f1)"
rm -f "$dir/data"
