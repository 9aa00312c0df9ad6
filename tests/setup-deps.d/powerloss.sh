# Sourced by scripts/install-test-deps (and CI): what tests/integration/test_powerloss.py needs.
#
# - fuse and libfuse2 (Debian): crashfs (tests/crashfs.py) is a FUSE file system written
#   with fusepy, which calls libfuse.so.2 through ctypes; the fuse package brings
#   fusermount, the fallback unmount.  The tests run as root and mount on /dev/fuse.
# - fusepy (PyPI) is a test extra of setup.py.
if ! ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 ' || ! command -v fusermount >/dev/null 2>&1; then
    _fuse_missing=1
fi
if [ -n "${_fuse_missing:-}" ]; then
    ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends fuse libfuse2 >/dev/null \
    || { ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends fuse libfuse2 >/dev/null; }
fi
unset _fuse_missing
