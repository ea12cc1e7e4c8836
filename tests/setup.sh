#!/bin/sh
# Installs what the tests need on a Debian 12 machine (as root): the real
# clients and tools the end-to-end tests drive, and cargo-nextest. README's
# test command runs this first; it is quick when everything is there.
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "tests/setup.sh: run as root (the tests make users, namespaces and nftables tables too)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Packages must not start daemons here (openssh-server would take port 22,
# which the sandbox tests listen on): policy-rc.d refuses service starts.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
fi

packages="
    openssh-client openssh-sftp-server openssh-server rsync curl ca-certificates
    iproute2 nftables conntrack kmod passwd e2fsprogs mount perl
    gcc libc6-dev python3 git keyutils util-linux procps
    python3-paramiko python3-asyncssh dropbear-bin putty-tools ssh-audit
    chromium chromium-driver
    systemd python3-prometheus-client
"
missing=
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The NAT lab's lossy-uplink test uses tc netem if the kernel can load it, and
# the userspace jusy-impair otherwise.
modprobe sch_netem 2>/dev/null || true

command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
