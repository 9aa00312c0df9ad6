# Sourced by scripts/install-test-deps (and CI): what tests/test_dns.py needs.
#
# - unbound (with unbound-control and unbound-checkconf): the real DNS server
#   tests/dnsserver.py starts on a loopback address, serving the test zones.
#   The package's own system resolver must not start: RUNLEVEL=1 keeps
#   invoke-rc.d from starting it, and the tests never use it.
if [ ! -x /usr/sbin/unbound ] || [ ! -x /usr/sbin/unbound-control ] || [ ! -x /usr/sbin/unbound-checkconf ]; then
    ${SUDO:-} env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
        --no-install-recommends unbound >/dev/null \
    || { ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         ${SUDO:-} env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
             --no-install-recommends unbound >/dev/null; }
fi
