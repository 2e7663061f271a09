# The data of hv.test=sha, its two digests and a floating-point sum, shared by the
# guest's /init (as /etc/sha.sh) and by xtask on the host, which runs it with the same
# busybox (every command resolved to a busybox applet) to know what the guest must print.
# Usage: sh sha.sh DIR   (DIR gets a 32 MiB file, data, which is removed again)
#
# HV-AWK-FP: 100,000 rounds of double arithmetic in busybox awk (SSE2 registers), only
# + * / (exactly rounded by IEEE 754, so the host's CPU gives the same bits; no libm
# function, whose variant glibc picks by CPUID), printed with 17 digits.
set -e
dir=$1
dd if=/dev/zero bs=1M count=32 2>/dev/null | tr '\0' x > "$dir/data"
echo "HV-SHA256 $(sha256sum < "$dir/data" | cut -d' ' -f1)"
echo "HV-GZIP-SHA256 $(gzip -c < "$dir/data" | sha256sum | cut -d' ' -f1)"
rm -f "$dir/data"
awk 'BEGIN { s = 0; p = 1; for (i = 1; i <= 100000; i++) { s += 1 / (i * i); p = p * 1.0000001 + 1 / i }
             printf "HV-AWK-FP %.17g %.17g\n", s, p }'
