# Sourced by scripts/install-test-deps (and CI): what tests/test_dkim.py needs.
#
# - opendkim-tools: opendkim-testmsg, the OpenDKIM verifier (Debian's libopendkim);
# - unbound: the DNS server the OpenDKIM check queries, started by the test on
#   127.0.0.1 inside a private network namespace (unshare from util-linux, ip from
#   iproute2); openssl makes the too-small RSA key of the config tests;
# - nodejs + npm and mailauth 4 (tests/js/package.json): the Node verifier.
#   mailauth >= 5 needs Node >= 22.19 and 4.9 needs >= 20.18; the project's machines ship
#   Node 20 (NodeSource), so nodejs is installed here only when node is missing altogether.
_dkim_pkgs=""
command -v opendkim-testmsg >/dev/null 2>&1 || _dkim_pkgs="$_dkim_pkgs opendkim-tools"
command -v unbound >/dev/null 2>&1 || _dkim_pkgs="$_dkim_pkgs unbound"
command -v unshare >/dev/null 2>&1 || _dkim_pkgs="$_dkim_pkgs util-linux"
command -v ip >/dev/null 2>&1 || _dkim_pkgs="$_dkim_pkgs iproute2"
command -v openssl >/dev/null 2>&1 || _dkim_pkgs="$_dkim_pkgs openssl"
command -v node >/dev/null 2>&1 || _dkim_pkgs="$_dkim_pkgs nodejs npm"
if [ -n "$_dkim_pkgs" ]; then
    # unbound's package would start a system resolver: keep it from starting
    ${SUDO:-} env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
        --no-install-recommends $_dkim_pkgs >/dev/null \
    || { ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         ${SUDO:-} env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
             --no-install-recommends $_dkim_pkgs >/dev/null; }
fi
unset _dkim_pkgs
_dkim_js="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../js" && pwd)"
if [ ! -d "$_dkim_js/node_modules/mailauth" ]; then
    (cd "$_dkim_js" && npm install --no-audit --no-fund --loglevel=error)
fi
unset _dkim_js
