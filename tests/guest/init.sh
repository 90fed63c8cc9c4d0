#!/bin/busybox sh
# /init of the icbd-cache test guest: a busybox initramfs that attaches NBD exports with the
# kernel's nbd driver and Debian's nbd-client, reports checksums on the serial console, and
# powers off. Built by tests/guest/guest.py; the host parses the ICBD-* lines.
#
# Kernel command line (read from /proc/cmdline):
#   icbd.server=10.0.2.2   NBD server as seen from the guest (QEMU user networking: host loopback)
#   icbd.port=P            its TCP port
#   icbd.test=T            checksum | cow | multiconn | cow-multiconn | reconnect |
#                          idle-persist | idle-icbd (one step, with icbd.export=NAME)
#   icbd.export=NAME       export name for icbd.test
#   icbd.steps=T:NAME,...  several steps in one boot (instead of icbd.test/icbd.export)
#   icbd.connections=N     connections for the *multiconn tests (default 4)
#   icbd.idle=S            seconds the idle-* tests leave the device unused (default 8)
#
# Console protocol, one line each, in this order per step:
#   ICBD-STEP <i> <test> <export>
#   ICBD-TCP-CONNS <n>          established TCP connections to the server port after connect
#   ICBD-SIZE <bytes>           blockdev --getsize64
#   ICBD-PART-SHA256 <off> <len> <hex>  (multiconn) sha256 of one slice, read on one CPU
#   ICBD-SHA256 <hex>           sha256 of the whole device
#   ICBD-PATTERN-SHA256 <hex>   (cow) sha256 of the 1 MiB pattern written at 4 MiB
#   ICBD-COW-READBACK-LIVE <hex>  (cow) that region read back (O_DIRECT) before disconnecting
#   ICBD-COW-READBACK <hex>     (cow) that region read back after disconnect + reconnect
#   ICBD-RECONNECT-READY        (reconnect) attached by icbd-nbd-client; the whole device is
#                               read next: the host kills and restarts the server meanwhile
#   ICBD-IO-ERRORS <n>          (reconnect) "I/O error" lines in the kernel log
#   ICBD-RECONNECTS <n>         (reconnect) reconnections icbd-nbd-client logged
#   ICBD-IDLE-WAIT <s>          (idle-*) attached, first MiB read; nothing for <s> seconds now
#   ICBD-ERROR <text>           anything that went wrong
#   ICBD-STEP-END <i> rc=<rc>
# and finally ICBD-TEST-DONE before the power-off.

export PATH=/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

say() { echo "ICBD-$*"; }
err() { echo "ICBD-ERROR $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

finish() {
    say TEST-DONE "$(uptime_s)"
    sync
    poweroff -f
    # not reached; if it is, exiting init panics the kernel and -no-reboot ends QEMU
    exit 1
}

say INIT "$(uptime_s)"
NCPU=$(nproc)

SERVER=10.0.2.2 PORT=10809 TEST= EXPORT= STEPS= CONNECTIONS=4 IDLE=8
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        icbd.server=*) SERVER=${arg#*=} ;;
        icbd.port=*) PORT=${arg#*=} ;;
        icbd.test=*) TEST=${arg#*=} ;;
        icbd.export=*) EXPORT=${arg#*=} ;;
        icbd.steps=*) STEPS=${arg#*=} ;;
        icbd.connections=*) CONNECTIONS=${arg#*=} ;;
        icbd.idle=*) IDLE=${arg#*=} ;;
    esac
done
[ -n "$STEPS" ] || STEPS="$TEST:$EXPORT"

# ---- modules, in dependency order (written by the builder) ----------------------------------
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m" || err "insmod $m failed"
done

# ---- network: QEMU user networking's default addresses, static ------------------------------
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 || err "no eth0"
ip link set eth0 up
ip route add default via 10.0.2.2
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 100 ]; do
    usleep 100000
    i=$((i + 1))
done
say NET-UP "$(uptime_s)"

# ---- helpers --------------------------------------------------------------------------------
# connect DEV EXPORT [nbd-client options]: attach /dev/DEV, retrying briefly (the previous
# user of the device may still be tearing down)
connect() {
    local dev=$1 exp=$2 try j
    shift 2
    for try in 1 2 3; do
        # the handshake has no timeout of its own: a server that never answers would hang here
        if timeout 30 nbd-client "$SERVER" "$PORT" "/dev/$dev" -N "$exp" "$@"; then
            # the size shows up asynchronously after a netlink connect
            j=0
            while [ "$(blockdev --getsize64 "/dev/$dev" 2>/dev/null || echo 0)" = 0 ] \
                    && [ $j -lt 50 ]; do
                usleep 100000
                j=$((j + 1))
            done
            say TCP-CONNS "$(tcp_conns)"
            return 0
        fi
        err "nbd-client $SERVER $PORT /dev/$dev -N $exp $* failed (try $try)"
        sleep 1
    done
    return 1
}

disconnect() {
    nbd-client -d "/dev/$1" || { err "nbd-client -d /dev/$1 failed"; return 1; }
}

# established (state 01) TCP connections whose remote port is the server port
tcp_conns() {
    local hex
    hex=$(printf '%04X' "$PORT")
    awk -v p=":$hex" '$3 ~ (p "$") && $4 == "01" { n++ } END { print n + 0 }' /proc/net/tcp
}

sha_of() { sha256sum | cut -d' ' -f1; }

report() {
    local size sum
    size=$(blockdev --getsize64 "$1") || { err "blockdev $1 failed"; return 1; }
    say SIZE "$size"
    sum=$(sha_of < "$1") || { err "reading $1 failed"; return 1; }
    say SHA256 "$sum"
}

# ---- tests ----------------------------------------------------------------------------------
test_checksum() {
    local exp=$1 rc=0
    shift
    connect nbd0 "$exp" "$@" || return 1
    report /dev/nbd0 || rc=1
    disconnect nbd0 || rc=1
    return $rc
}

# run "$@" on CPU $1 (modulo the CPU count): the nbd driver maps each CPU to one hardware queue,
# and hardware queue i sends on connection i, so pinning decides which connection carries I/O
on_cpu() {
    local cpu=$(($1 % NCPU))
    shift
    if [ "$NCPU" -gt 1 ]; then taskset "$(printf '%x' $((1 << cpu)))" "$@"; else "$@"; fi
}

# Several connections: read one slice of the device per CPU at once (O_DIRECT, pinned, so each
# slice travels on its own connection), report each slice's sha256, then the whole device.
test_multiconn() {
    local exp=$1 rc=0 size part n off cnt
    connect nbd0 "$exp" -C "$CONNECTIONS" || return 1
    size=$(blockdev --getsize64 /dev/nbd0)
    part=$((size / NCPU / 1048576))
    if [ "$part" -lt 1 ] || [ $((size % 1048576)) != 0 ]; then
        err "device size $size is not a multiple of 1 MiB or too small for $NCPU slices"
        disconnect nbd0
        return 1
    fi
    n=0
    while [ $n -lt "$NCPU" ]; do
        off=$((n * part)) cnt=$part
        [ $n = $((NCPU - 1)) ] && cnt=$((size / 1048576 - off))
        (
            sum=$(on_cpu $n dd if=/dev/nbd0 bs=1048576 skip=$off count=$cnt iflag=direct \
                2>/dev/null | sha_of)
            echo "ICBD-PART-SHA256 $((off * 1048576)) $((cnt * 1048576)) $sum" > /tmp/part.$n
        ) &
        n=$((n + 1))
    done
    wait
    n=0
    while [ $n -lt "$NCPU" ]; do
        cat /tmp/part.$n || rc=1
        n=$((n + 1))
    done
    report /dev/nbd0 || rc=1
    disconnect nbd0 || rc=1
    return $rc
}

# Write 1 MiB at 4 MiB, read it back directly, disconnect, reconnect (same guest, same client
# address as far as the server can tell) on another device, read it back and checksum it all.
# Writes run on the first CPU and reads on the last, so with several connections (cow-multiconn
# on a guest with several CPUs) the readback travels on another connection than the write.
test_cow() {
    local exp=$1 rc=0 size
    shift
    yes ICBD | head -c 1048576 > /tmp/pattern
    say PATTERN-SHA256 "$(sha_of < /tmp/pattern)"
    connect nbd0 "$exp" "$@" || return 1
    size=$(blockdev --getsize64 /dev/nbd0)
    if [ "$size" -lt 5242880 ]; then
        err "device too small for the cow test: $size bytes"
        disconnect nbd0
        return 1
    fi
    on_cpu 0 dd if=/tmp/pattern of=/dev/nbd0 bs=1048576 seek=4 count=1 oflag=direct \
        conv=notrunc,fsync 2>/dev/null || { err "write failed"; rc=1; }
    blockdev --flushbufs /dev/nbd0 || rc=1
    sync
    say COW-READBACK-LIVE "$(on_cpu $((NCPU - 1)) dd if=/dev/nbd0 bs=1048576 skip=4 count=1 \
        iflag=direct 2>/dev/null | sha_of)"
    disconnect nbd0 || rc=1
    connect nbd1 "$exp" "$@" || return 1
    say COW-READBACK "$(on_cpu $((NCPU - 1)) dd if=/dev/nbd1 bs=1048576 skip=4 count=1 \
        iflag=direct 2>/dev/null | sha_of)"
    report /dev/nbd1 || rc=1
    disconnect nbd1 || rc=1
    return $rc
}

# Attach with icbd-cache's reconnecting client (pxe/initramfs/icbd-nbd-client.c: held requests,
# a 4 s I/O timeout so that requests caught on the wire are sent again soon), then read the
# whole device while the host kills and restarts the server; report what was read, the I/O
# errors and the reconnections the kernel log shows.
test_reconnect() {
    local exp=$1 rc=0
    [ -x /bin/icbd-nbd-client ] || { err "this guest has no icbd-nbd-client"; return 1; }
    icbd-nbd-client "$SERVER" -N "$exp" "$PORT" /dev/nbd0 -C "$CONNECTIONS" -R 120 -t 4 \
        || { err "icbd-nbd-client failed"; return 1; }
    say RECONNECT-READY
    report /dev/nbd0 || rc=1
    say IO-ERRORS "$(dmesg | grep -c 'I/O error')"
    say RECONNECTS "$(dmesg | grep -c 'reconnected to')"
    disconnect nbd0 || rc=1
    return $rc
}

# Attach with a client that reconnects (Debian's nbd-client -persist, ioctl mode; or
# icbd-nbd-client), read the first MiB, use nothing for $IDLE seconds (a server with a shorter
# --idle-timeout closes the connection meanwhile), then read the whole device: it reads right,
# with no I/O error, over the connection the client made again.
test_idle() {
    local exp=$1 client=$2 rc=0
    if [ "$client" = icbd ]; then
        [ -x /bin/icbd-nbd-client ] || { err "this guest has no icbd-nbd-client"; return 1; }
        icbd-nbd-client "$SERVER" -N "$exp" "$PORT" /dev/nbd0 -R 120 -t 4 \
            || { err "icbd-nbd-client failed"; return 1; }
    else
        connect nbd0 "$exp" -persist -nonetlink || return 1
    fi
    dd if=/dev/nbd0 of=/dev/null bs=1048576 count=1 iflag=direct 2>/dev/null \
        || { err "first read failed"; rc=1; }
    say IDLE-WAIT "$IDLE"
    sleep "$IDLE"
    report /dev/nbd0 || rc=1
    say IO-ERRORS "$(dmesg | grep -c 'I/O error')"
    say RECONNECTS "$(dmesg | grep -c 'reconnected to')"
    disconnect nbd0 || rc=1
    return $rc
}

# ---- run the steps --------------------------------------------------------------------------
i=0
for step in $(echo "$STEPS" | tr ',' ' '); do
    i=$((i + 1))
    t=${step%%:*} e=${step#*:}
    say STEP "$i" "$t" "$e"
    case "$t" in
        checksum) test_checksum "$e" ;;
        multiconn) test_multiconn "$e" ;;
        cow) test_cow "$e" ;;
        cow-multiconn) test_cow "$e" -C "$CONNECTIONS" ;;
        reconnect) test_reconnect "$e" ;;
        idle-persist) test_idle "$e" persist ;;
        idle-icbd) test_idle "$e" icbd ;;
        *) err "unknown test '$t'"; false ;;
    esac
    rc=$?
    say STEP-END "$i" "rc=$rc" "$(uptime_s)"
done
finish
