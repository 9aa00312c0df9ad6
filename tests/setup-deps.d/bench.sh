# Sourced by scripts/install-test-deps (and CI): Debian packages for bench/load.py.
#
# bench/load.py drives Postfix's smtp-source against the mta, a private Postfix instance
# and smtp-sink; all three programs come from Debian's postfix package.  Installing it
# must not ask questions nor configure/start a system instance: preseed "No configuration".
# Everything else the harness uses is in Python's standard library.
if [ ! -x /usr/sbin/smtp-source ] || [ ! -x /usr/sbin/smtp-sink ] || [ ! -x /usr/sbin/postfix ]; then
    echo "postfix postfix/main_mailer_type select No configuration" | ${SUDO:-} debconf-set-selections
    ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postfix >/dev/null \
    || { ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends postfix >/dev/null; }
fi
