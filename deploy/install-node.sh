#!/bin/sh
# Installs and starts a jusy node on this machine (as root).
#
#   install-node.sh --broker HOST:PORT --broker-key KEY --binary PATH
#                   [--owner-file FILE] [--release-key HEX]
#                   [--ready-slots N] [--disk-mib N]
#                   [--prefix /usr/local] [--config-dir /etc/jusy]
#                   [--state-dir /var/lib/jusy-node]
#                   [--unit-dir /etc/systemd/system] [--no-systemd]
#
# The owner hash (your secret: it earns for this node's sessions) is read from
# --owner-file or asked for at the terminal, never taken on the command line,
# and written to the configuration file only (mode 0600).
#
# Steps: check that this kernel has what the sandbox needs; install the binary
# and the configuration; run `jusy-node check` (root, cgroups, loop devices,
# nftables, programs, disk, the relay over UDP); start the node as a systemd
# service, or, with --no-systemd (where systemd is not PID 1), directly in the
# background with its log in the state directory.
set -eu

die() { printf 'install-node: %s\n' "$*" >&2; exit 1; }
say() { printf 'install-node: %s\n' "$*"; }

broker= broker_key= binary= owner_file= release_key= ready_slots= disk_mib=
prefix=/usr/local config_dir=/etc/jusy state_dir=/var/lib/jusy-node
unit_dir=/etc/systemd/system systemd=yes
here=$(cd "$(dirname "$0")" && pwd)

while [ $# -gt 0 ]; do
    case $1 in
        --broker) broker=${2:?}; shift 2 ;;
        --broker-key) broker_key=${2:?}; shift 2 ;;
        --binary) binary=${2:?}; shift 2 ;;
        --owner-file) owner_file=${2:?}; shift 2 ;;
        --release-key) release_key=${2:?}; shift 2 ;;
        --ready-slots) ready_slots=${2:?}; shift 2 ;;
        --disk-mib) disk_mib=${2:?}; shift 2 ;;
        --prefix) prefix=${2:?}; shift 2 ;;
        --config-dir) config_dir=${2:?}; shift 2 ;;
        --state-dir) state_dir=${2:?}; shift 2 ;;
        --unit-dir) unit_dir=${2:?}; shift 2 ;;
        --no-systemd) systemd=no; shift ;;
        --owner|--owner=*) die "--owner is refused: the owner hash is a secret and a command line is readable by every process; use --owner-file or answer the prompt" ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ -n "$broker" ] || die "--broker HOST:PORT is required (the relay's QUIC address)"
[ -n "$broker_key" ] || die "--broker-key is required (the 64 hex characters the broker printed)"
[ -n "$binary" ] || die "--binary is required (the jusy-node release to install)"
[ -f "$binary" ] || die "$binary: no such file"

# What the sandbox needs from this kernel, before anything is installed.
[ "$(id -u)" = 0 ] || die "run as root: sessions are users, cgroups, mounts and nftables tables of their own"
[ -d /sys/fs/cgroup ] || die "no /sys/fs/cgroup: mount cgroup2 (or the v1 memory and pids controllers)"
grep -qw cgroup2 /proc/filesystems || [ -d /sys/fs/cgroup/memory ] \
    || die "this kernel has neither cgroup2 nor a v1 memory controller"
[ -e /dev/loop-control ] || die "no /dev/loop-control: load the loop module (modprobe loop)"
command -v nft >/dev/null 2>&1 || die "nft not found: install nftables"
command -v useradd >/dev/null 2>&1 || die "useradd not found: install passwd"
[ -e /proc/self/ns/net ] || die "this kernel has no network namespaces"

# The owner hash: from a file or the terminal, never argv.
owner=
if [ -n "$owner_file" ]; then
    owner=$(tr -d ' \n\r\t' < "$owner_file") || die "cannot read $owner_file"
elif [ -t 0 ]; then
    printf 'Owner hash (from your node-owner page; input hidden): '
    stty -echo; IFS= read -r owner; stty echo; printf '\n'
fi
if [ -z "$owner" ]; then
    die "no owner hash: pass --owner-file FILE or run at a terminal to be asked"
fi
case $owner in
    *[!0-9a-fA-F]*) die "the owner hash is 64 hexadecimal characters" ;;
esac
[ ${#owner} -eq 64 ] || die "the owner hash is 64 hexadecimal characters"

umask 077
mkdir -p "$prefix/bin" "$config_dir" "$state_dir"
chmod 0700 "$config_dir" "$state_dir"
install -m 0755 "$binary" "$prefix/bin/jusy-node.new"
mv -f "$prefix/bin/jusy-node.new" "$prefix/bin/jusy-node"
config="$config_dir/node.toml"
{
    printf '# Written by install-node.sh; see deploy/node.example.toml.\n'
    printf 'broker = "%s"\n' "$broker"
    printf 'broker_key = "%s"\n' "$broker_key"
    printf 'owner = "%s"\n' "$owner"
    printf 'data_dir = "%s"\n' "$state_dir"
    [ -z "$release_key" ] || printf 'release_key = "%s"\n' "$release_key"
    [ -z "$ready_slots" ] || printf 'ready_slots = %s\n' "$ready_slots"
    [ -z "$disk_mib" ] || printf 'disk_mib = %s\n' "$disk_mib"
} > "$config.new"
chmod 0600 "$config.new"
mv -f "$config.new" "$config"
say "installed $prefix/bin/jusy-node and $config"

# Everything the node needs, tried the way it uses it.
"$prefix/bin/jusy-node" check --config "$config" || die "jusy-node check found problems (above); fix them and run this again"

if [ "$systemd" = yes ]; then
    [ -d /run/systemd/system ] || die "systemd is not running here: pass --no-systemd to start the node directly"
    sed -e "s#/usr/local/bin/jusy-node#$prefix/bin/jusy-node#" \
        -e "s#/etc/jusy/node.toml#$config#" \
        -e "s#--data-dir /var/lib/jusy-node#--data-dir $state_dir#" \
        "$here/systemd/jusy-node.service" > "$unit_dir/jusy-node.service"
    systemctl daemon-reload
    systemctl enable --now jusy-node.service
    say "started: systemctl status jusy-node; journalctl -u jusy-node"
else
    log="$state_dir/node.log"
    setsid "$prefix/bin/jusy-node" --config "$config" --log-format json \
        < /dev/null >> "$log" 2>&1 &
    printf '%s\n' "$!" > "$state_dir/node.pid"
    say "started in the background (pid $!): log in $log, stop with kill \$(cat $state_dir/node.pid)"
fi
