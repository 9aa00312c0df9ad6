# Sourced by scripts/install-test-deps (and CI): what the HTTP injection API tests and
# bench/http_load.py need.
#
# - wrk and nginx-light (Debian): the load generator and the peer it is compared with;
#   nginx's package must not start a system instance (RUNLEVEL=1), bench/http_load.py
#   starts its own on loopback with its own configuration;
# - nodejs + npm and the npm `sparkpost` client (tests/js-http/package.json; it and the
#   scripts there run on Debian 12's Node 18 as on Node 20);
# - the PyPI `sparkpost` client is a test extra of setup.py.
_http_pkgs=""
command -v wrk >/dev/null 2>&1 || _http_pkgs="$_http_pkgs wrk"
[ -x /usr/sbin/nginx ] || _http_pkgs="$_http_pkgs nginx-light"
command -v node >/dev/null 2>&1 || _http_pkgs="$_http_pkgs nodejs npm"
if [ -n "$_http_pkgs" ]; then
    ${SUDO:-} env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
        --no-install-recommends $_http_pkgs >/dev/null \
    || { ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         ${SUDO:-} env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
             --no-install-recommends $_http_pkgs >/dev/null; }
fi
unset _http_pkgs
_http_js="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../js-http" && pwd)"
if [ ! -d "$_http_js/node_modules/sparkpost" ]; then
    (cd "$_http_js" && npm install --no-audit --no-fund --loglevel=error)
fi
unset _http_js
