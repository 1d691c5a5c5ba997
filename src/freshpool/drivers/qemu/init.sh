#!/bin/sh
# PID 1 of a freshpool VM node (no systemd): mounts, the node's identity from its
# config drive, networking, sshd; an ACPI power button press shuts it down cleanly.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
say() { echo "freshpool-init: $*" > /dev/console; }
fail() { say "FAILED: $*"; sync; echo o > /proc/sysrq-trigger; sleep 10; }

# The initramfs hands over /proc, /sys, /dev and /run mounted; mount them only if not.
mountpoint -q /proc || mount -t proc -o nosuid,nodev,noexec proc /proc
mountpoint -q /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -o remount,rw / || fail "cannot mount the root file system read-write"
chmod 1777 /tmp

# The config drive: a tar archive on the second disk, written by the driver per node.
config=/run/freshpool
mkdir -p -m 700 $config
tar -x -C $config -f /dev/vdb || fail "cannot read the config drive /dev/vdb"
. $config/node.env

hostname "$FP_HOSTNAME"
echo "$FP_HOSTNAME" > /etc/hostname
printf '127.0.0.1\tlocalhost\n%s\t%s\n' "${FP_ADDRESS%/*}" "$FP_HOSTNAME" > /etc/hosts
: > /etc/resolv.conf

modprobe -q virtio_net
modprobe -q button
modprobe -q evdev
ip link set lo up
ip link set eth0 up || fail "no network interface eth0"
ip address add "$FP_ADDRESS" dev eth0
ip route add default via "$FP_GATEWAY"

# Keys of this node only: the shared base carries none.
install -m 600 $config/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
install -m 644 $config/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ed25519_key.pub
home=$(getent passwd "$FP_USER" | cut -d: -f6)
[ -n "$home" ] || fail "no user $FP_USER in the image"
mkdir -p "$home/.ssh"
install -m 600 $config/authorized_keys "$home/.ssh/authorized_keys"
chown -R "$FP_USER:" "$home/.ssh"
chmod 700 "$home/.ssh"
# Without PAM sshd refuses a locked account ('!'), keys included; '*' still allows
# no password login.
sed -i "s/^$FP_USER:![^:]*:/$FP_USER:*:/" /etc/shadow
mkdir -p /run/sshd

/usr/sbin/sshd -D -e -h /etc/ssh/ssh_host_ed25519_key \
    -o UsePAM=no -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no \
    -o KbdInteractiveAuthentication=no -o PubkeyAuthentication=yes \
    -o AuthorizedKeysFile=.ssh/authorized_keys -o UseDNS=no -o PrintMotd=no \
    -o PrintLastLog=no -o MaxStartups=100:30:200 2>> /run/sshd.log &
say "sshd started"

# Wait for the ACPI power button (QMP system_powerdown). While it waits, the shell
# also reaps orphans: its wait() collects any child, as PID 1 must.
while :; do
    button=
    for name in /sys/class/input/event*/device/name; do
        if [ "$(cat "$name" 2>/dev/null)" = "Power Button" ]; then
            button=/dev/input/${name#/sys/class/input/}
            button=${button%/device/name}
        fi
    done
    # The device node appears a moment after the module loads.
    if [ -c "$button" ]; then
        dd if="$button" of=/dev/null bs=24 count=1 status=none &
        wait $! && break
    fi
    sleep 1 &
    wait $!
done
say "power button: shutting down"
kill -TERM -1
sleep 1
kill -KILL -1
sync
mount -o remount,ro /
echo o > /proc/sysrq-trigger
sleep 10
