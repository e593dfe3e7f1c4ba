#!/bin/sh
# /init of the ScsiGate test guest (busybox sh). Loads the storage modules,
# exports scsigate.KEY=VALUE kernel parameters as SCSIGATE_KEY=VALUE, runs
# /tests/$SCSIGATE_TEST.sh, prints the end marker and powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb
# note: Debian's static busybox runs its own applets in preference to PATH, so real
# tools that share an applet's name (modprobe, blkdiscard) are called by full path
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
exec </dev/console >/dev/console 2>&1

finish() {
    echo "SCSIGATE-GUEST-EXIT rc=$1"
    sync
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

# scsigate.foo-bar=v -> SCSIGATE_FOO_BAR=v  (values cannot contain spaces; use commas)
for w in $(cat /proc/cmdline); do
    case $w in
        scsigate.*=*)
            k=${w%%=*}; k=${k#scsigate.}; v=${w#*=}
            k=$(echo "$k" | tr 'a-z.-' 'A-Z__')
            export "SCSIGATE_$k=$v"
            ;;
    esac
done

echo "scsigate-guest: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu(s), up $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /etc/scsigate-modules); do
    /usr/sbin/modprobe "$m" 2>&1 || echo "scsigate-guest: warning: modprobe $m failed"
done

if [ -z "${SCSIGATE_TEST:-}" ]; then
    echo "scsigate-guest: no scsigate.test=NAME on the kernel command line; tests: $(cd /tests && ls *.sh | sed 's/\.sh$//' | tr '\n' ' ')"
    finish 127
fi
t="/tests/$SCSIGATE_TEST.sh"
if [ ! -x "$t" ]; then
    echo "scsigate-guest: no test named $SCSIGATE_TEST"
    finish 127
fi
echo "scsigate-guest: running $SCSIGATE_TEST (modules loaded at $(cut -d' ' -f1 /proc/uptime)s)"
cd /tmp
/bin/sh "$t"
rc=$?
echo "scsigate-guest: $SCSIGATE_TEST finished at $(cut -d' ' -f1 /proc/uptime)s"
finish $rc
