# Sourced by scripts/install-test-deps (and CI): what tests/test_dkim.py needs.
#
# - opendkim-tools: opendkim-testmsg, the OpenDKIM verifier (Debian's libopendkim);
# - unbound: the DNS server the OpenDKIM check queries, started by the test on
#   127.0.0.1 inside a private network namespace (unshare from util-linux, ip from
#   iproute2); openssl makes the too-small RSA key of the config tests;
# - nodejs + npm and mailauth 4: the Node verifier (tests/js/verify.mjs).  nodejs is
#   installed here only when node is missing altogether: then it is Debian 12's, Node 18.
#   mailauth >= 5 needs Node >= 22.19 and 4.9 (undici 7, joi 18) >= 20.18.1, so on a Node
#   of at least 20.18.1 (the project's machines: Node 20 from NodeSource) the verifier is
#   tests/js/package.json's mailauth 4.9.5, on an older one tests/js/node18's 4.8.2 (the
#   newest 4.x whose dependencies all run on Node 18), linked as tests/js/node_modules.
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
if node -e 'const [a, b, c] = process.versions.node.split(".").map(Number);
            process.exit(a > 20 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1)'; then
    _dkim_dir="$_dkim_js"
else
    _dkim_dir="$_dkim_js/node18"
fi
_dkim_want="$(node -p 'require(process.argv[1]).dependencies.mailauth' "$_dkim_dir/package.json")"
_dkim_have="$(node -p 'require(process.argv[1]).version' \
    "$_dkim_js/node_modules/mailauth/package.json" 2>/dev/null || true)"
if [ "$_dkim_have" != "$_dkim_want" ]; then
    echo "mailauth $_dkim_want for node $(node --version): npm ci in $_dkim_dir"
    rm -rf "$_dkim_js/node_modules"     # another version's directory, or the link to it
    (cd "$_dkim_dir" && npm ci --no-audit --no-fund --loglevel=error)
    if [ "$_dkim_dir" != "$_dkim_js" ]; then
        ln -s "${_dkim_dir#"$_dkim_js"/}/node_modules" "$_dkim_js/node_modules"
    fi
fi
unset _dkim_js _dkim_dir _dkim_want _dkim_have
